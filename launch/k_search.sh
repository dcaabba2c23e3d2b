#!/usr/bin/env bash
# K search (paper appendix A.3): SeqMatch with K = 2..6 subsets (or a given
# list), scored on the validation split; one expert set shared by every K.
#
#   bash launch/k_search.sh CONFIG WORKDIR [K list, default 2,3,4,5,6] [--config.x=y ...]
#   bash launch/k_search.sh configs/digits.py runs/ksearch 2,3 --config.mtt.lr_img=100
#
# Each K runs `seqmatch_jax.main --config.mode=distill` in WORKDIR/k<K> with
# the backbone's per-subset tuples cleared (its scalars then apply to every
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

# The backbone (from the config, or a --config.backbone.name override), its
# per-subset tuples and the total iterations (the backbone's iterations per
# subset summed, unless ITERATIONS is set).
read -r KEY TOTAL_CONFIG PER_SUBSET < <(python - "$CONFIG" "$@" <<'EOF'
import importlib.util, sys
from seqmatch_jax import backbones, seqmatch
path, _, arg = sys.argv[1].partition(':')
spec = importlib.util.spec_from_file_location('k_search_config', path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
c = module.get_config(arg or None)
for a in sys.argv[2:]:
  if a.startswith('--config.backbone.name='):
    c.backbone.name = a.split('=', 1)[1]
cls = backbones.backbone_class(c.backbone.name)
total = sum(p.iterations for p in seqmatch.subset_plans(c))
print(cls.config_key, total, ','.join(cls.per_subset))
EOF
)
TOTAL=${ITERATIONS:-$TOTAL_CONFIG}
CLEAR=(--config.seqmatch.subset_ipc='()')
for name in ${PER_SUBSET//,/ }; do
  CLEAR+=(--config."$KEY".per_subset."$name"='()')
done

COMMON=(--config="$CONFIG" --config.experts.dir="${EXPERTS_DIR:-$WORKDIR/experts}"
        --config.seqmatch.compare_backbone=False)
first=${KS%% *}
python -m seqmatch_jax.main "${COMMON[@]}" --workdir="$WORKDIR/k$first" \
  --config.mode=experts "$@"
for K in $KS; do
  ITERS=$(( (TOTAL + K - 1) / K ))
  echo "K=$K: $ITERS iterations per subset ($TOTAL in all)"
  python -m seqmatch_jax.main "${COMMON[@]}" --workdir="$WORKDIR/k$K" \
    --config.mode=distill --config.seqmatch.num_subsets="$K" "${CLEAR[@]}" \
    --config."$KEY".iterations="$ITERS" "$@"
done
# shellcheck disable=SC2086
python -m seqmatch_jax.analyze --config="$CONFIG" --k_search="$WORKDIR" \
  ${ANALYZE_FLAGS:-} "$@"
