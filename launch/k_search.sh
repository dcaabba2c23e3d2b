#!/usr/bin/env bash
# K search (paper appendix A.3): SeqMatch with K = 2..6 subsets (or a given
# list), scored on the validation split; one expert set shared by every K.
#
#   bash launch/k_search.sh CONFIG WORKDIR [K list, default 2,3,4,5,6] [--config.x=y ...]
#   bash launch/k_search.sh configs/digits.py runs/ksearch 2,3 --config.distill.lr_img=100
#
# Each K runs `seqmatch_jax.main --config.mode=distill` in WORKDIR/k<K> with
# the per-subset lists cleared (the distill.* scalars then apply to every
# subset) and the config's total distillation iterations split equally over
# the K subsets (ITERATIONS=N overrides that total). Experts are trained once,
# in WORKDIR/experts (or EXPERTS_DIR, e.g. those of an earlier run). Finally
# `seqmatch_jax.analyze --k_search=WORKDIR` scores every k<K>/synthetic.npz on
# the validation split (dataset.val_size > 0) and writes
# WORKDIR/analysis/k_search.{png,json}; ANALYZE_FLAGS passes it more flags, e.g.
# ANALYZE_FLAGS="--k_search_models=2 --k_search_epochs=100".
# Extra --config.* overrides go to every command. Rerunning resumes.
set -euo pipefail
CONFIG=${1:?config, e.g. configs/digits.py}
WORKDIR=${2:?workdir}
shift 2
KS="2,3,4,5,6"
if [[ $# -gt 0 && $1 != --* ]]; then
  KS=$1
  shift
fi
KS=${KS//,/ }

# The config's total iterations (distill.iterations, or the sum of the
# per-subset seqmatch.iterations when given), unless ITERATIONS is set.
TOTAL=${ITERATIONS:-$(python - "$CONFIG" <<'EOF'
import importlib.util, sys
path, _, arg = sys.argv[1].partition(':')
spec = importlib.util.spec_from_file_location('k_search_config', path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
c = module.get_config(arg or None)
its = tuple(c.seqmatch.iterations)
print(sum(its) if its else c.distill.iterations * c.seqmatch.num_subsets)
EOF
)}

COMMON=(--config="$CONFIG" --config.experts.dir="${EXPERTS_DIR:-$WORKDIR/experts}"
        --config.seqmatch.compare_backbone=False)
first=${KS%% *}
python -m seqmatch_jax.main "${COMMON[@]}" --workdir="$WORKDIR/k$first" \
  --config.mode=experts "$@"
for K in $KS; do
  ITERS=$(( (TOTAL + K - 1) / K ))
  echo "K=$K: $ITERS iterations per subset ($TOTAL in all)"
  python -m seqmatch_jax.main "${COMMON[@]}" --workdir="$WORKDIR/k$K" \
    --config.mode=distill --config.seqmatch.num_subsets="$K" \
    --config.seqmatch.subset_ipc='()' --config.seqmatch.iterations='()' \
    --config.seqmatch.max_start_epoch='()' --config.seqmatch.lr_img='()' \
    --config.seqmatch.syn_steps='()' --config.seqmatch.expert_epochs='()' \
    --config.seqmatch.lr_teacher='()' --config.seqmatch.lr_lr='()' \
    --config.distill.iterations="$ITERS" "$@"
done
# shellcheck disable=SC2086
python -m seqmatch_jax.analyze --config="$CONFIG" --k_search="$WORKDIR" \
  ${ANALYZE_FLAGS:-} "$@"
