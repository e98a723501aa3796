#!/bin/bash
# The first device call of the engine work: correctness, then QAT throughput against the anchor.
R=scripts/device/run.sh
T=90 bash $R setup check
if python3 -c "import json,os,sys; sys.exit(0 if json.load(open(os.environ['OUT']+'/gemm_check.json'))['ok'] else 1)" 2>/dev/null; then
  echo "gemm_check ok: the cuBLASLt engine runs"
  MODES=qat T=110 bash $R smol; T=90 bash $R anchor-smol
  MODES=qat T=120 bash $R qwen; T=110 bash $R anchor-qwen
  MODES=qat T=45 bash $R burn-smol
else
  echo "gemm_check failed: burn's path and the anchor only"
  MODES=qat T=90 bash $R smol burn-smol; T=90 bash $R anchor-smol
  MODES=qat T=110 bash $R burn-qwen; T=110 bash $R anchor-qwen
fi
