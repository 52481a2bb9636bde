#!/usr/bin/env bash
# The pi05-small rows of the SFT success table (issue 3) on one CUDA GPU: bench/sft_success.py as one process per
# (variant, task, demos, training seed), all at once, then pooled per variant. On the lent device machine:
#   bash bench/pixels_gpu.sh exec $OUT bash bench/sft_success_gpu.sh $OUT
# Environment (defaults = the run in docs/RESULTS.md, "pi05-small SFT success on a GPU"): PY (python3), CONFIG
# (pi05-small), DEVICE (cuda), VARIANTS ("delta"; "default" = absolute actions; "shift4" = delta + 4 px random-shift
# augmentation; "px128shift8" = delta, 128 px renders and model input, 8 px shift; "told" = delta + the object
# state in the prompt, a diagnostic: can the model learn the task when it need not localise; "ord" / "told_ord" =
# delta / told with the state-bin embeddings initialised in order; "cont" / "told_cont" = delta / told with the state
# (and told object state) also as one continuous prefix token; "film" / "told_film" / "told_cont_film" = delta /
# told / told_cont with that vector also conditioning the action expert's adaRMS norms, Pi05Config.state_film;
# "kp" = delta + 16 spatial-softmax keypoints per camera (Pi05Config.keypoint_tokens); "kp_film" = kp with the
# keypoints FiLM-conditioned on the prompt; "kp_fixed" = kp on the fixed-colour diagnostic; "kp_pd" / "kp_fixed_pd" =
# kp / kp_fixed with half of each camera's SigLIP patch tokens masked per training sample,
# Pi05Config.patch_token_dropout; "kp_pq" = kp + 2 keypoints asked by the prompt, Pi05Config.keypoint_prompt_queries;
# "kp_pq_aux" = kp_pq with the first query of both cameras pulled onto the named cube, SFTConfig.keypoint_aux),
# TASKS ("pick_place push stack"),
# DEMOS ("10 20"), SEEDS ("0 1 2"), STEPS (1000), EPISODES (20), JOB_LIMIT (seconds per process, 450: its SIGTERM
# stops the evaluation after the episode in progress and the seed is reported on the episodes done), EXTRA (more
# sft_success.py arguments). DIR gets sft_<config>_<variant>.json (pooled) and sft_runs.tar.gz (every process's JSON
# and log).
set -u
out=${1:?usage: bench/sft_success_gpu.sh DIR}
py=${PY:-python3}
config=${CONFIG:-pi05-small}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
runs=$(mktemp -d /tmp/sft_runs.XXXX)
declare -A flags=([default]="" [delta]="--override delta_actions=true"
  [shift4]="--override delta_actions=true --image-shift 4"
  [px128shift8]="--override delta_actions=true --override image_size=128 --image-size 128 128 --image-shift 8"
  [told]="--override delta_actions=true --override privileged_dim=21 --override max_token_len=56"
  [ord]="--override delta_actions=true --override ordinal_state_bins=true"
  [told_ord]="--override delta_actions=true --override privileged_dim=21 --override max_token_len=56
    --override ordinal_state_bins=true"
  [cont]="--override delta_actions=true --override continuous_state=true"
  [told_cont]="--override delta_actions=true --override privileged_dim=21 --override max_token_len=56
    --override continuous_state=true"
  [film]="--override delta_actions=true --override state_film=true"
  [told_film]="--override delta_actions=true --override privileged_dim=21 --override max_token_len=56
    --override state_film=true"
  [told_cont_film]="--override delta_actions=true --override privileged_dim=21 --override max_token_len=56
    --override continuous_state=true --override state_film=true"
  [kp]="--override delta_actions=true --override keypoint_tokens=16"
  [kp_film]="--override delta_actions=true --override keypoint_tokens=16 --override keypoint_film=true"
  [kp_fixed]="--override delta_actions=true --override keypoint_tokens=16 --colors fixed"
  [kp_pd]="--override delta_actions=true --override keypoint_tokens=16 --override patch_token_dropout=0.5"
  [kp_fixed_pd]="--override delta_actions=true --override keypoint_tokens=16 --override patch_token_dropout=0.5
    --colors fixed"
  [kp_pq]="--override delta_actions=true --override keypoint_tokens=16 --override keypoint_prompt_queries=2"
  [kp_pq_aux]="--override delta_actions=true --override keypoint_tokens=16 --override keypoint_prompt_queries=2
    --keypoint-aux 2 --keypoint-aux-cameras front wrist")
for v in ${VARIANTS:-delta}; do
  [[ -v "flags[$v]" ]] || { echo "unknown variant '$v' (known: ${!flags[*]})" >&2; exit 2; }
done
pids=()
for v in ${VARIANTS:-delta}; do
  for task in ${TASKS:-pick_place push stack}; do
    for n in ${DEMOS:-10 20}; do
      for s in ${SEEDS:-0 1 2}; do
        name=$v-$task-$n-s$s
        # shellcheck disable=SC2086
        timeout -k 60 "${JOB_LIMIT:-450}" "$py" bench/sft_success.py --config "$config" --tasks "$task" \
          --demos "$n" --seeds 1 --first-seed "$s" --steps "${STEPS:-1000}" --batch-size 64 --lr 5e-4 --warmup 100 \
          --episodes "${EPISODES:-20}" --device "${DEVICE:-cuda}" ${flags[$v]} ${EXTRA:-} \
          --out "$runs/$name.json" >"$runs/$name.log" 2>&1 &
        pids+=($!)
      done
    done
  done
done
echo "$(date -u +%T) started ${#pids[@]} processes"
for p in "${pids[@]}"; do wait "$p"; done
echo "$(date -u +%T) all ended"
for v in ${VARIANTS:-delta}; do
  files=$(ls "$runs"/$v-*.json 2>/dev/null)
  [[ -n $files ]] || { echo "$v: no process finished"; continue; }
  # shellcheck disable=SC2086
  "$py" bench/sft_success.py --pool $files --out "$out/sft_${config}_$v.json" \
    | grep -E '"(task|demos|success_mean|pooled_from)"'
done
grep -h '^{"task"' "$runs"/*.log
tar -czf "$out/sft_runs.tar.gz" -C "$runs" . && rm -rf "$runs"
