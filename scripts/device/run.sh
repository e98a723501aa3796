#!/bin/bash
# Device script of the engine work (issue 13). Usage: bash scripts/device/run.sh STAGE... (binaries, wheels and tokenizer files in .gpu/, see crates/train/results/engine_notes.md)
# Stages: setup check smol burn-smol qwen burn-qwen q35 anchor-smol anchor-qwen serve decode-anchor
# Engine stages run with QATFLOW_GEMM=cublaslt unless they start with burn-.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH}
export QATFLOW_LOG=info
B=/tmp/qatflow
T=${T:-170}
stamp() { echo "=== $(date +%T) $*"; }
sample() { # sample nvidia-smi memory.used (MiB) into $OUT/$1 until killed
  while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$OUT/$1"; sleep 0.2; done }
peak() { sort -n "$OUT/$1" | tail -1; }
summ() { python3 -c "
import json,sys;d=json.load(open('$1'))['$2']
print('$3 $2', 'tok/s %.0f'%d['tokens_per_s'], 'step %.3f'%d['median_step_s'], 'fb %.3f'%d['median_forward_backward_s'], 'opt %.3f'%d['median_optimizer_s'], 'gemm %.3f wait %.3f n %d'%(d['median_gemm_s'],d['median_gemm_wait_s'],d['gemms_per_step']), 'peak proc',d['peak_process_gpu_mib'],'dev',d['peak_device_gpu_mib'],'before',d['device_gpu_mib_before'])" 2>&1 | tail -1; }
for stage in "$@"; do
  case $stage in
  setup)
    stamp setup
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ls /usr/local/cuda/lib64 2>/dev/null | grep -i "cublasLt.so" | head -3
    for f in .gpu/*.xz; do n=$(basename $f .xz); xz -dc $f > /tmp/$n && chmod +x /tmp/$n; done
    ;;
  check)
    stamp check; QATFLOW_GEMM=cublaslt timeout 120 /tmp/gemm_check > $OUT/gemm_check.json 2> $OUT/gemm_check.log; echo "rc=$?"; tail -3 $OUT/gemm_check.log
    python3 - <<'PY'
import json,os
d=json.load(open(os.environ["OUT"]+"/gemm_check.json"))
print("ok",d["ok"],"failures",d["failures"][:5])
for c in d["checks"]: print(c["m"],c["k"],c["n"],{p:[round(c[p][k],5) for k in ("rel_err_y","rel_err_dx","rel_err_dw")] for p in ("cublaslt","burn")})
for b in d["bench_linear_fwd_bwd"]: print(b["m"],b["k"],b["n"],{p:(round(b[p]["median_ms"],2),round(b[p]["tflops"],1)) for p in ("cublaslt","burn")})
PY
    ;;
  smol|qwen|q35|smol4|burn-smol|burn-qwen)
    case $stage in smol|burn-smol) M=smollm2-135m;; smol4) M=qwen3-4b;; q35) M=qwen3.5-2b;; *) M=qwen3-1.7b;; esac
    ENVS="QATFLOW_GEMM=cublaslt"; [[ $stage == burn-* ]] && ENVS="QATFLOW_GEMM=burn"
    for mode in ${MODES:-plain qat}; do
      stamp "$stage $M $mode $ENVS"
      env $ENVS timeout $T $B bench-train --device cuda --model $M --precision ${PREC:-bf16-kahan} --warmup 2 --steps 5 --mode $mode --out $OUT/${stage}_$mode.json > /dev/null 2> $OUT/${stage}_$mode.log
      echo "rc=$?"; grep -v "^\s*$" $OUT/${stage}_$mode.log | tail -3 | cut -c1-400
      summ $OUT/${stage}_$mode.json $mode $stage
    done
    ;;
  anchor-smol|anchor-qwen)
    [ -d /tmp/site ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1; }
    M=smollm2-135m; [[ $stage == anchor-qwen ]] && M=qwen3-1.7b
    stamp "$stage"
    sample smi_$stage.txt & SP=$!
    PYTHONPATH=/tmp/site OUT=$OUT/$stage timeout $T python3 .gpu/modelopt_qat_anchor.py $M 2>&1 | grep -v Warning | tail -4
    kill $SP; echo "$stage nvidia-smi peak MiB: $(peak smi_$stage.txt)"
    ;;
  serve)
    stamp serve
    $B model init --config smollm2-135m --out /tmp/smol --bf16 --tokenizer-from .gpu/smoltok > /dev/null 2>&1 || echo "init failed"
    $B serve /tmp/smol --device cuda --precision bf16 --port 8011 > $OUT/serve_stdout.log 2> $OUT/serve.log &
    SV=$!
    for i in $(seq 120); do grep -q listening $OUT/serve_stdout.log 2>/dev/null && break; sleep 1; done
    stamp "serving after $i s"
    timeout $T $B bench --endpoint http://127.0.0.1:8011 --category ${CATS:-verbosity,factual} --out $OUT/serve_bench.json > $OUT/serve_bench.txt 2>&1; echo "bench rc=$?"
    tail -25 $OUT/serve_bench.txt
    kill $SV; wait $SV 2>/dev/null; tail -3 $OUT/serve.log | cut -c1-300
    ;;
  decode-anchor)
    stamp decode-anchor; timeout $T python3 .gpu/decode_anchor.py 2>&1 | grep -v Warning | tail -4
    ;;
  esac
done
stamp done
