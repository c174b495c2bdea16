"""Print the device slug that names benchmark results and baselines (bench/run.sh, .ci/gpu).

``cuda-<GPU name>`` when torch sees a GPU, else ``cpu-<CPU model>-<torch threads>t``;
lower case, runs of other characters as one ``-``: e.g. ``cuda-nvidia-h200``,
``cpu-amd-epyc-2t``.
"""

import re

import torch

if torch.cuda.is_available():
    name = "cuda-" + torch.cuda.get_device_name(0)
else:
    model = ""
    try:
        model = next(line.split(":", 1)[1] for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = f"cpu-{model}-{torch.get_num_threads()}t"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
