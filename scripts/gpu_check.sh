#!/usr/bin/env bash
# The one command to run on a lent GPU machine (bare: python3 with PyTorch + CUDA and numpy; no network,
# nothing installed, no mediapipe / OpenCV / PyAV / ONNX Runtime GPU / TensorRT). From the repository root:
#
#     bash scripts/gpu_check.sh
#
# Everything goes into one folder, $OUT if set, else out/gpu_check:
#   gpu.json, gpu.png   benchmarks/gpu.py's report (format in its docstring) and plot (if matplotlib is there)
#   run.log             what the benchmark printed
#   nvidia-smi.txt      nvidia-smi's output (and its one-line query)
#   env.txt             python, packages present or absent, torch / CUDA / cuDNN, GPUs, CPU, memory, disk
# It takes under 8 minutes: the benchmark stops itself after GPU_CHECK_BUDGET_S (default 390 s, partial
# results kept), and is killed at that plus 60 s whatever happens (its JSON is written after every
# configuration). Extra arguments go to the benchmark, e.g. `bash scripts/gpu_check.sh --modes fp32 bf16`.
set -u -o pipefail
cd "$(dirname "$0")/.."

out_dir="${OUT:-out/gpu_check}"
budget_s="${GPU_CHECK_BUDGET_S:-390}"
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the engine imports from the checkout: no pip install
export PYTHONUNBUFFERED=1

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "python3: $(command -v python3 || echo absent)"
    echo "cpus: $(nproc)"
    free -m 2>/dev/null || true
    df -h . 2>/dev/null || true
    python3 - <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

print("python", sys.version.replace("\n", " "))
for dist, mod in (("torch", "torch"), ("numpy", "numpy"), ("triton", "triton"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                  ("onnxruntime-gpu", "onnxruntime"), ("tensorrt", "tensorrt"), ("matplotlib", "matplotlib"),
                  ("mediapipe", "mediapipe"), ("opencv-python", "cv2"), ("opencv-contrib-python", "cv2"), ("av", "av"),
                  ("aiortc", "aiortc")):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: absent" + (f" (module {mod} importable)" if importlib.util.find_spec(mod) else ""))
try:
    import torch
except ImportError as e:
    print("torch does not import:", e)
    raise SystemExit(0)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
EOF
    echo "C compiler (Triton and Inductor need one for torch.compile): $(command -v cc || command -v gcc || echo absent)"
} > "$out_dir/env.txt" 2>&1

if command -v nvidia-smi >/dev/null 2>&1; then
    { nvidia-smi; echo; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv; } \
        > "$out_dir/nvidia-smi.txt" 2>&1
else
    echo "nvidia-smi not found" > "$out_dir/nvidia-smi.txt"
fi

timeout -k 10 "$((${budget_s%.*} + 60))" \
    python3 -m benchmarks.gpu --device cuda --out "$out_dir/gpu.json" --budget-s "$budget_s" "$@" 2>&1 | tee "$out_dir/run.log"
rc=${PIPESTATUS[0]}
echo "benchmark exit code $rc" | tee -a "$out_dir/run.log"
echo "send back the folder $out_dir:"
ls -l "$out_dir"
exit "$rc"
