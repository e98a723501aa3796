#!/bin/bash
# A short device call: correctness, then SmolLM2 QAT on both engines beside the anchor.
R=scripts/device/run.sh
T=80 bash $R setup check
if python3 -c "import json,os,sys; sys.exit(0 if json.load(open(os.environ['OUT']+'/gemm_check.json'))['ok'] else 1)" 2>/dev/null; then
  echo "gemm_check ok"; MODES=qat T=100 bash $R smol
else
  echo "gemm_check failed"; MODES=qat T=60 bash $R smol
fi
T=80 bash $R anchor-smol
MODES=qat T=70 bash $R burn-smol
MODES=qat T=100 bash $R qwen
