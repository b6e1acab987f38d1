# Before/after runs of two checkouts on one GPU, in one device call, each to $OUT.
#   git archive OLD_COMMIT jaxllm scripts | tar -x -C .oldcode     # (ignored folder, carried)
#   bash benchmarks/before_after.sh .:new:bf16 .oldcode:old:bf16 pp-.:new:bf16 pp-.oldcode:old:bf16 m2
# A job CODE:TAG:WEIGHTS runs CODE's scripts/bench.py (tg128 at batch 1 and 8, three shapes);
# pp-CODE:TAG:WEIGHTS runs benchmarks/prefill_of.py (pp512); m2 runs bench.py's M2 of this checkout.
# .whl/ holds the gguf wheel, which the GPU image lacks (carried with the call).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,serial,driver_version --format=csv,noheader | tee $OUT/gpu.txt
ANCH=$PWD/benchmarks/results/NVIDIA-H200-2026-11-29-llamacpp.json
bench() {  # code tag weights
  python3 $1/scripts/bench.py --suite gpu --shapes smol135m,llama1b,llama8b --weights $3 --batches 1,8 \
    --only-decode --no-peers --only M3,M4,M5 --anchors $ANCH --out $OUT/$2-$3.json 2>&1 | grep -vE "^\s*$" | tail -14
}
for job in "$@"; do
  case $job in
    pp-*) set -- $(echo ${job#pp-} | tr ':' ' '); python3 benchmarks/prefill_of.py $1 $OUT/pp-$2.json smol135m,llama1b,llama8b $3 2>&1 | tail -12 ;;
    m2) python3 scripts/bench.py --suite gpu --shapes smol135m --weights bf16 --batches 1 --only M2 --no-peers \
          --anchors $ANCH --out $OUT/m2.json 2>&1 | grep -E "M2|gemv|matmul" | tail -30 ;;
    *) set -- $(echo $job | tr ':' ' '); bench $1 $2 $3 ;;
  esac
done
