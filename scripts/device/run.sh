#!/bin/bash
# Device script of the engine work (issue 13). Usage: bash scripts/device/run.sh STAGE... (binaries, wheels and tokenizer files in .gpu/, see crates/train/results/engine_notes.md)
# Stages: setup check smol burn-smol qwen burn-qwen q35 q35-9b q8 anchor-smol anchor-qwen anchor-q8
#         anchor-q35 anchor-q35-9b q35tiny serve decode-anchor
# Engine stages run with QATFLOW_GEMM=cublaslt unless they start with burn-. Environment:
# MODES (plain qat), PREC (bf16-kahan), MOMENTS (fp32 | bf16), T (stage time limit, s),
# EXTRA (more bench-train arguments, e.g. "--grad-clip 0 --update-during-backward").
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
    for f in .gpu/*.xz; do n=$(basename $f .xz); [ /tmp/$n -nt $f ] || { xz -dc $f > /tmp/$n && chmod +x /tmp/$n; }; done
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
  smol|qwen|q35|q35-9b|q8|smol4|burn-smol|burn-qwen)
    case $stage in smol|burn-smol) M=smollm2-135m;; smol4) M=qwen3-4b;; q35) M=qwen3.5-2b;;
      q35-9b) M=qwen3.5-9b;; q8) M=qwen3-8b;; *) M=qwen3-1.7b;; esac
    ENVS="QATFLOW_GEMM=cublaslt"; [[ $stage == burn-* ]] && ENVS="QATFLOW_GEMM=burn"
    for mode in ${MODES:-plain qat}; do
      stamp "$stage $M $mode $ENVS"
      env $ENVS timeout $T $B bench-train --device cuda --model $M --precision ${PREC:-bf16-kahan} --moments ${MOMENTS:-fp32} --warmup ${WARMUP:-2} --steps ${STEPS:-5} --mode $mode ${EXTRA} --out $OUT/${stage}${TAG}_$mode.json > /dev/null 2> $OUT/${stage}${TAG}_$mode.log
      echo "rc=$?"; grep -v "^\s*$" $OUT/${stage}${TAG}_$mode.log | tail -3 | cut -c1-400
      summ $OUT/${stage}${TAG}_$mode.json $mode $stage$TAG
    done
    ;;
  anchor-smol|anchor-qwen|anchor-q8|anchor-q35|anchor-q35-9b)
    [ -d /tmp/site ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1; }
    S=.gpu/modelopt_qat_anchor.py
    case $stage in anchor-smol) M=smollm2-135m;; anchor-q8) M=qwen3-8b;; anchor-qwen) M=qwen3-1.7b;;
      anchor-q35) M=qwen3.5-2b; S=scripts/device/anchor_qwen35.py;;
      anchor-q35-9b) M="qwen3.5-9b --steps ${STEPS:-3}"; S=scripts/device/anchor_qwen35.py;; esac
    stamp "$stage"
    sample smi_$stage.txt & SP=$!
    PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site OUT=$OUT/$stage timeout $T python3 $S $M 2>&1 | grep -v Warning | tail -5
    kill $SP; echo "$stage nvidia-smi peak MiB: $(peak smi_$stage.txt)"
    ;;
  q35tiny)
    # The ModelOpt fixture's tiny Qwen3.5 on the GPU: per-sequence NLL against transformers'
    # float32 logits (crates/model/tests/fixtures), and decoding against the chunked forward.
    stamp q35tiny
    python3 scripts/device/q35tiny.py setup /tmp/q35tiny || exit 1
    for dev in cpu cuda; do
      $B eval nll /tmp/q35tiny/model --token-ids /tmp/q35tiny/ids.json --device $dev --precision f32 > $OUT/q35tiny_nll_$dev.json 2> $OUT/q35tiny_nll_$dev.log; echo "nll $dev rc=$?"
      for ids in ids ids_long; do for p in f32 bf16; do
        $B eval decode /tmp/q35tiny/model --token-ids /tmp/q35tiny/$ids.json --prefill 20 --device $dev --precision $p --tolerance 1 > $OUT/q35tiny_decode_${dev}_${ids}_$p.json 2> $OUT/q35tiny_decode_${dev}_${ids}_$p.log; echo "decode $dev $ids $p rc=$?"
      done; done
    done
    python3 scripts/device/q35tiny.py compare /tmp/q35tiny $OUT
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
