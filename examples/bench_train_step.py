"""Fine-tuning cost: one training step (forward + backward + AdamW step) of the sparse model in masked execution vs
the dense model: step time and peak memory, side by side (issue #14 item 2).

Random weights and inputs (cost does not depend on them); cross-entropy on the logits for both models, so the figure
is the cost of masked execution itself (predictors, masked attention, both spatial paths). The DynamicViT loss adds a
frozen teacher's forward to a real fine-tuning step; that cost is the same dense forward whatever tokenprune does.

Timing: both models in one process, steps interleaved (dense, sparse, sparse, dense, ...), median over pairs of
sparse time / dense time ("time x", wall clock), which cancels slow drifts of a shared machine. "cpu x" is the same
ratio of the process's CPU time (all threads): a second view for a CPU shared with other processes, where wall time
also counts a thread's waits for a descheduled sibling (more ops, more waits); spinning threads count in both.

Peak memory:
  * cuda: `torch.cuda.max_memory_allocated` over one step, reset before it (everything live: weights, grads,
    optimizer state, activations).
  * cpu: the CPU allocator keeps no high-water mark, so one extra step runs under `torch.profiler` with
    `profile_memory=True`, which records every allocation and free of a tensor; the peak of their running sum over
    the step, plus the bytes of the tensors live when it starts (weights, optimizer state, the batch), is the step's
    peak of live tensor memory (blocks allocated before profiling are not seen when freed: a slight over-count).
    Process RSS is not used: the C allocator keeps freed pages, so it over-counts.

    python examples/bench_train_step.py --batch-size 8 --threads 2            # CPU, DeiT-S and ConvNeXt-T
    python examples/bench_train_step.py --device cuda --amp bf16               # recipes' batch sizes (128)

Results (2026-12-02, `--batch-size 128 --threads 2 --repeats 5`, one model per run, random weights, CPU AMD EPYC,
2 cores, idle machine):
    DeiT-S      time 1.14x (cpu 1.15x; pairs 1.07-1.18x), peak memory 8406 vs 7618 MiB = 1.10x
    ConvNeXt-T  time 1.16x (cpu 1.14x; pairs 1.12-1.18x), peak memory 15527 vs 13755 MiB = 1.13x
Earlier, `--batch-size 8 --repeats 7` on a loaded machine: DeiT-S 1.24x / 1.08x, ConvNeXt-T 1.09x / 1.11x; before the
fused masked attention (explicit [B, H, N, N] softmax kept for the backward), DeiT-S time 1.70x, memory 1.44x.
Not yet measured: a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import _EventType

import tokenprune
from tokenprune.measure.speed import describe_device

#: model -> (name in tables, batch size of its recipe in recipes/)
MODELS = {"deit_small_patch16_224": ("DeiT-S", 128), "convnext_tiny": ("ConvNeXt-T", 128)}
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Step:
    """One model with its optimizer; `__call__` runs one training step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> None:
        self.model, self.x, self.y, self.amp = model.train(), x, y, amp
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.x.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()

    def live_bytes(self) -> int:
        """Bytes of the tensors live between steps: weights, optimizer state, the batch (grads are set to None)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + [self.x, self.y]
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    sync(step.x.device)
    start, cpu = time.perf_counter(), time.process_time()
    step()
    sync(step.x.device)
    return time.perf_counter() - start, time.process_time() - cpu


def peak_bytes(step: Step) -> int:
    """Peak bytes of live tensors during one step (see the module docstring for the method)."""
    device = step.x.device
    step.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    start = step.live_bytes()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative for a free
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return start + peak


def build(name: str, ratio: float, device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = timm.create_model(name).to(device)
    sparse = tokenprune.sparsify(dense, ratio, example_inputs=torch.randn(2, 3, 224, 224, device=device))
    return dense.train(), sparse.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model's recipe (128)")
    parser.add_argument("--ratio", type=float, default=0.7, help="base keep ratio rho")
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs of steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--amp", choices=list(AMP), default="none", help="autocast dtype (recipes: bf16 on GPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print("command: python " + " ".join(sys.argv))
    print(
        f"device: {describe_device(device)}, threads: {torch.get_num_threads()}, amp: {args.amp}, "
        f"rho {args.ratio}, torch {torch.__version__}, timm {timm.__version__}"
    )
    header = (
        f"{'model':<12}{'batch':>6}{'ms dense':>10}{'ms sparse':>11}{'time x':>8}{'cpu x':>7}"
        f"{'MiB dense':>11}{'MiB sparse':>12}{'mem x':>7}"
    )
    rows = []
    for name in args.models:
        label, recipe_batch = MODELS.get(name, (name, 128))
        batch = args.batch_size or recipe_batch
        dense, sparse = build(name, args.ratio, device)
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        steps = {"dense": Step(dense, x, y, AMP[args.amp]), "sparse": Step(sparse, x, y, AMP[args.amp])}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        memory = {key: peak_bytes(step) / 2**20 for key, step in steps.items()}
        times: dict[str, list[tuple[float, float]]] = {"dense": [], "sparse": []}
        for r in range(args.repeats):
            order = ("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")
            for key in order:
                times[key].append(timed(steps[key]))
        ratio, cpu_ratio = (
            statistics.median(s[i] / d[i] for d, s in zip(times["dense"], times["sparse"])) for i in (0, 1)
        )
        ms = {key: statistics.median(t[0] for t in ts) * 1e3 for key, ts in times.items()}
        rows.append(
            f"{label:<12}{batch:>6}{ms['dense']:>10.0f}{ms['sparse']:>11.0f}{ratio:>7.2f}x{cpu_ratio:>6.2f}x"
            f"{memory['dense']:>11.0f}{memory['sparse']:>12.0f}{memory['sparse'] / memory['dense']:>6.2f}x"
        )
        print(rows[-1], flush=True)
        pairs = sorted(s[0] / d[0] for d, s in zip(times["dense"], times["sparse"]))
        print(f"  {label}: wall-time ratio of each pair, sorted: " + ", ".join(f"{r:.2f}" for r in pairs), flush=True)
        del dense, sparse, steps
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
