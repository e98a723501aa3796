#!/bin/bash
# Device call of 2026-12-07/08, fourteenth session. Stages by name (first argument a list),
# each skipped when it would not end inside LIMIT seconds. A kernel that fails its first run
# is turned off for the rest of the call (QATFLOW_KERNELS_OFF) and the stage retried once.
#   first:  gemm_check, Qwen3-1.7B QAT bf16-kahan, the anchor, bf16-plain, phase times
#   second: (H200) Qwen3.5-9B, Qwen3-8B, 8B anchor; 50-step curves; GPU resume check
#   layerwise: Qwen3-1.7B unclipped without/with --update-during-backward (+ bf16-plain with it);
#   q35-9b-lw, q8-lw: the 9B/8B memory runs with it
#   ab-mem: parameters in CubeCL's persistent pool or not (two builds; carry .gpu2/qatflow_s14a.xz)
#   profile: every CubeCL kernel of the layer-wise Qwen3-1.7B step timed
#   q35-ab: Qwen3.5-2B with the fused gated delta rule kernels and with the chunked tensor form
#   q35tiny, q35tiny-fused: the fixture's NLL/decoding against transformers, tensor forms / fused kernels
# Carries .gpu and .xfer/whl. Usage: LIMIT=540 bash scripts/device/call_s14.sh "stage ..." ["stages on an H200"]
R=scripts/device/run.sh
[ -d .xfer/whl ] && mkdir -p .gpu/whl && cp .xfer/whl/*.whl .gpu/whl/
ALL_OFF=attention,softmax,adamw,square_sum,mean_last,rms_norm
export QATFLOW_KERNELS_OFF=${QATFLOW_KERNELS_OFF:-}
fits() { local t=$1; shift; if [ $((SECONDS + t)) -le ${LIMIT:-560} ]; then T=$t "$@"; else echo "=== skipped (no time left): $*"; fi; }
gemm_check() {
  echo "=== $(date +%T) gemm_check"
  QATFLOW_GEMM=cublaslt timeout $T /tmp/gemm_check > $OUT/gemm_check.json 2> $OUT/gemm_check.log; echo "rc=$?"
  grep -v "^\s*$" $OUT/gemm_check.log | tail -8 | cut -c1-600
  python3 -c "
import json; d=json.load(open('$OUT/gemm_check.json'))
print('ok', d['ok'], d['failures'][:8]); print('attention', json.dumps(d['attention'])[:1500]); print('adamw', json.dumps(d['adamw'])[:800]); print('square_sum', json.dumps(d['square_sum'])); print('rms_norm', json.dumps(d['rms_norm'])[:800]); print('deltanet', json.dumps(d.get('deltanet'))[:1500])
for b in d['bench_linear_fwd_bwd']: print(b['m'], b['k'], b['n'], {p: round(b[p]['tflops'], 1) for p in ('cublaslt', 'burn')})" 2>&1 | tail -14; }
# qwen_try TAG PREC: Qwen3-1.7B QAT; if it exits non-zero with kernels on, all kernels off and once more.
qwen_try() {
  PREC=$2 MOMENTS=bf16 MODES=qat TAG=$1 bash $R qwen
  if [ -z "$QATFLOW_KERNELS_OFF" ] && ! [ -s $OUT/qwen$1_qat.json ]; then
    echo "=== the engine kernels failed: retry with QATFLOW_KERNELS_OFF=$ALL_OFF"; grep -i "error\|panic" $OUT/qwen$1_qat.log | head -5 | cut -c1-500
    export QATFLOW_KERNELS_OFF=$ALL_OFF; PREC=$2 MOMENTS=bf16 MODES=qat TAG=$1_off bash $R qwen
  fi; }
# phases [MODEL]: one step's time by phase (Qwen3-1.7B unless named), layer-wise BF16-Kahan
phases() {
  local m=${1:-qwen3-1.7b}
  echo "=== $(date +%T) $m phase times"
  QATFLOW_GEMM=cublaslt QATFLOW_GEMM_SYNC=1 QATFLOW_PHASE_TIMES=1 timeout $T /tmp/qatflow bench-train \
    --device cuda --model $m --precision bf16-kahan --moments bf16 --warmup 1 --steps 3 \
    --mode qat --grad-clip 0 --update-during-backward --out $OUT/phases_$m.json > /dev/null 2> $OUT/phases_$m.log; echo "rc=$?"
  python3 -c "import json;d=json.load(open('$OUT/phases_$m.json'))['qat'];print('step',d['median_step_s'],'fb',d['median_forward_backward_s'],'opt',d['median_optimizer_s'],'gemm',d['median_gemm_s'],'phases',d['median_phase_s'])"; }
# curve PATH [TAG ARGS...]: 50 steps of Qwen3-1.7B on one GEMM path (extra bench-train ARGS)
curve() {
  local path=$1 tag=${2:-$1}; shift; shift
  echo "=== $(date +%T) 50 steps qwen3-1.7b $tag"
  QATFLOW_GEMM=$path timeout $T /tmp/qatflow bench-train --device cuda --model qwen3-1.7b \
    --precision bf16-kahan --moments bf16 --warmup 0 --steps 50 --mode qat --lr 1e-4 "$@" \
    --out $OUT/curve_qwen3-1.7b_$tag.json > /dev/null 2> $OUT/curve_qwen3-1.7b_$tag.log; echo "rc=$?"; }
T=40 bash $R setup
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
big() { [ "$mem" -gt 100000 ] || { echo "=== skipped (needs an H200): $*"; return 1; }; }
STAGES=$1
# On an H200 (> 100 GB) the second argument, when given, replaces the list.
[ "$mem" -gt 100000 ] && [ -n "$2" ] && STAGES=$2
for s in $STAGES; do case $s in
  check) fits 150 gemm_check;;
  kahan) fits 150 qwen_try _bf16-kahan bf16-kahan;;
  plain) fits 80 qwen_try _bf16-plain bf16-plain;;
  anchor) fits 150 bash $R anchor-qwen;;
  anchor-qat) # the anchor's QAT half only (its plain half first costs the stage limit)
    aq() { echo "=== $(date +%T) anchor qwen3-1.7b QAT only"
      [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
      ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> $OUT/smi_anchor_qat.txt; sleep 0.2; done ) & SP=$!
      PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.gpu timeout $T python3 -c "
import modelopt_qat_anchor as a
a.qat_throughput('qwen3-1.7b', a.configs()['qwen3-1.7b'], quant=True)" 2>&1 | grep -v -i warn | tail -3
      kill $SP; echo "anchor QAT nvidia-smi peak MiB: $(sort -n $OUT/smi_anchor_qat.txt | tail -1)"; rm $OUT/smi_anchor_qat.txt; }
    fits 220 aq;;
  phases) fits 80 phases;;
  phases-q35) fits 120 phases qwen3.5-2b;;
  profile) # every CubeCL kernel of the layer-wise BF16-Kahan step timed (CUBECL_DEBUG_LOG=1), summed by kind
    prof() { echo "=== $(date +%T) profile qwen3-1.7b qat layer-wise"; rm -f /tmp/cubecl.log
      CUBECL_DEBUG_LOG=1 QATFLOW_GEMM=cublaslt timeout $T /tmp/qatflow bench-train --device cuda \
        --model qwen3-1.7b --precision bf16-kahan --moments bf16 --warmup 1 --steps 2 --mode qat \
        --grad-clip 0 --update-during-backward --out $OUT/profile.json > /dev/null 2> $OUT/profile.log; echo "rc=$?"
      awk -F'|' 'NF>=3 {n=$3; gsub(/ /,"",n); t=$2; gsub(/ /,"",t); v=t+0;
        if (t ~ /ms$/) v*=1000; else if (t ~ /ns$/) v/=1000; else if (t !~ /µs$/ && t ~ /s$/) v*=1e6;
        s[n]+=v; c[n]++} END {for (k in s) printf "%10.1f ms %7d %s\n", s[k]/1000, c[k], k}' \
        /tmp/cubecl.log | sort -rn > $OUT/profile_kernels.txt
      head -30 $OUT/profile_kernels.txt | cut -c1-300
      head -c 60000000 /tmp/cubecl.log | xz -T8 -3 > $OUT/cubecl_train.log.xz; }
    fits 90 prof;;
  smol) PREC=bf16-kahan MOMENTS=bf16 MODES=qat fits 60 bash $R smol;;
  anchor-smol) fits 100 bash $R anchor-smol;;
  layerwise) # the same step with each block updated during backward, beside the step without (both unclipped)
    PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_noclip EXTRA="--grad-clip 0" fits 80 bash $R qwen
    PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_layerwise EXTRA="--grad-clip 0 --update-during-backward" fits 80 bash $R qwen
    PREC=bf16-plain MOMENTS=bf16 MODES=qat TAG=_plain_layerwise EXTRA="--grad-clip 0 --update-during-backward" fits 80 bash $R qwen;;
  lw) # the engine's fastest and leanest step: each block updated during backward, BF16-Kahan then BF16-plain
    PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_layerwise EXTRA="--grad-clip 0 --update-during-backward" fits 80 bash $R qwen
    PREC=bf16-plain MOMENTS=bf16 MODES=qat TAG=_plain_layerwise EXTRA="--grad-clip 0 --update-during-backward" fits 80 bash $R qwen;;
  ab-mem) # the build measured on 2026-12-08 (.gpu2/qatflow_s14a.xz) against the one loading its
    # weights into CubeCL's persistent pool (.gpu/qatflow.xz), Qwen3-1.7B layer-wise, alternating
    xz -dc .gpu2/qatflow_s14a.xz > /tmp/qatflow_s14a && chmod +x /tmp/qatflow_s14a
    for prec in bf16-plain bf16-kahan; do for b in qatflow_s14a qatflow; do
      abm() { echo "=== $(date +%T) $b $prec"
        QATFLOW_GEMM=cublaslt timeout $T /tmp/$b bench-train --device cuda --model qwen3-1.7b \
          --precision $prec --moments bf16 --warmup 2 --steps 5 --mode qat --grad-clip 0 \
          --update-during-backward --out $OUT/abm_${b}_$prec.json > /dev/null 2> $OUT/abm_${b}_$prec.log; echo "rc=$?"
        python3 -c "import json;d=json.load(open('$OUT/abm_${b}_$prec.json'))['qat'];print('tok/s %.0f'%d['tokens_per_s'],'peak',d['peak_process_gpu_mib'],'steps',[round(x,3) for x in d['step_seconds']])"; }
      fits 75 abm
    done; done;;
  q35-9b-lw) big $s && MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 TAG=_layerwise EXTRA="--grad-clip 0 --update-during-backward" fits 130 bash $R q35-9b;;
  q8-lw) big $s && MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=3 TAG=_layerwise EXTRA="--grad-clip 0 --update-during-backward" fits 130 bash $R q8;;
  q35-9b) big $s && MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 fits 130 bash $R q35-9b;;
  q8) big $s && MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=3 fits 130 bash $R q8;;
  anchor-q8) big $s && fits 200 bash $R anchor-q8;;
  q35) PREC=bf16-kahan MOMENTS=bf16 MODES=qat fits 100 bash $R q35;;
  q35-ab) # Qwen3.5-2B layer-wise: the fused gated delta rule kernels, then the chunked tensor form
    PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_fused EXTRA="--grad-clip 0 --update-during-backward" fits 100 bash $R q35
    QATFLOW_KERNELS_OFF=deltanet PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_chunked EXTRA="--grad-clip 0 --update-during-backward" fits 130 bash $R q35;;
  q35tiny) fits 60 bash $R q35tiny;;
  q35tiny-fused) # the fixture's NLL and decoding through the fused kernels (engine on)
    mkdir -p $OUT/fused; OUT=$OUT/fused QATFLOW_GEMM=cublaslt fits 60 bash $R q35tiny;;
  anchor-q35) fits 150 bash $R anchor-q35;;
  curves) fits 80 curve cublaslt; fits 110 curve burn
    [ -f $OUT/curve_qwen3-1.7b_burn.json ] && python3 scripts/device/compare_curves.py $OUT/curve_qwen3-1.7b_cublaslt.json $OUT/curve_qwen3-1.7b_burn.json;;
  curves-lw) fits 80 curve cublaslt noclip --grad-clip 0; fits 80 curve cublaslt layerwise --grad-clip 0 --update-during-backward
    [ -f $OUT/curve_qwen3-1.7b_layerwise.json ] && python3 scripts/device/compare_curves.py $OUT/curve_qwen3-1.7b_noclip.json $OUT/curve_qwen3-1.7b_layerwise.json;;
  resume) if [ $((SECONDS + 100)) -le $((${LIMIT:-560} + 20)) ]; then bash scripts/device/resume_gpu.sh .gpu/tok 2>&1 | tee $OUT/resume_gpu.txt; else echo "=== skipped resume check"; fi;;
esac; done
echo "=== end $(date +%T) kernels off: '${QATFLOW_KERNELS_OFF}'"
# Everything written as one archive (a call brings back a limited number of files).
(cd $OUT && tar czf /tmp/out.tgz --exclude='smi_*' . && rm -rf ./* && mv /tmp/out.tgz $OUT/out.tgz)
