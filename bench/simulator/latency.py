"""How long one engine step takes: a linear model in what the step computes and reads.

    step_ms = step_base_ms                                  weights read, launches, sampling
            + token_ms        * tokens in the step          GEMMs, per token computed
            + context_pair_ms * sum(chunk x cached context)  a prefill chunk attending to KV
                                                             already in the cache
            + self_pair_ms    * sum(chunk^2 / 2)            a chunk attending to itself (causal)
            + kv_read_ms_per_token * KV tokens decodes read  each decode reads its whole KV; a
                                                             block shared by several, once
            + seq_ms          * sequences in the step       per-sequence host and kernel work

A step holds the engine's batch: decodes first, then prefill chunks, within
max_batched_tokens and max_num_seqs (engine/scheduler.py). The constants come from our own GPU
runs of bench/offline.py (llama3-8b shape, bf16, max_num_seqs 256, max_batched_tokens 8192);
`bench/simulator/calibration.py` derives them from the result files and replays the same four
scenarios through a simulated replica, so the fit is checked, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

# Llama-3-8B: 32 layers x 8 KV heads x 128 dims x (K and V) x 2 bytes (bf16).
LLAMA3_8B_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2


@dataclass(frozen=True)
class LatencyModel:
    """Step-time constants of one card running one model shape (see the module docstring).

    Derivation, per card, from bench/results/offline-llama3-8b-<card>.json:
    - kv_read_ms_per_token: KV bytes per token / the copy bandwidth measured in the same run;
      or, where a served run's step logs exist (`calibration --served`, H200), fitted on its
      pure-decode graph steps: served batches read KV at ~75% of the copy bandwidth, and each
      row sharing a prefix pays for its blocks (dedup_shared_kv False; bench.step_fit).
    - token_ms: (bare 128-token TTFT - decode ms/step at batch 1) / 127: the cost of 127 more
      tokens in one step, everything else equal.
    - step_base_ms: decode ms/step at batch 1 minus one token, one sequence and its KV read
      (prompt 512 + ~64 generated tokens on average).
    - context_pair_ms: (TTFT of 128 new on 8,192 cached - bare 128-token TTFT) / (128 x 8,192).
    - self_pair_ms: the cold 8,320-token TTFT is two steps (8,192-token budget): a 8,192-token
      chunk and then 128 tokens on 8,192 cached (which costs the cached TTFT); what the first
      step leaves after base and tokens is its causal attention, 8,192^2 / 2 pairs.
    - seq_ms: fitted (bisection) so that the ShareGPT-like scenario's requests/s, replayed
      through a simulated replica, equals the measured one.
    - eager_launch_ms, piecewise_launch_ms: measured, not fitted: the median host time of eager
      and piecewise forwards in bench/profile_mixed.py (the offline scenarios are graph steps
      or GPU-bound batches, so none of them shows it).
    The shared-prefix scenario (8 x 32 requests on 2,048-token prefixes) is the hold-out check.
    """

    card: str
    source: str
    step_base_ms: float
    token_ms: float
    context_pair_ms: float
    self_pair_ms: float
    kv_read_ms_per_token: float
    seq_ms: float
    # Host time to launch one eager forward (~230 Triton launches, ~130 matmuls): a step the
    # engine cannot replay from a CUDA graph takes at least this long (SimReplica._step_seconds).
    eager_launch_ms: float = 0.0
    # Host time to launch a piecewise step (~33 graph replays, 32 attention launches): the floor
    # of steps the engine runs as piecewise graphs (engine/piecewise_graphs.py).
    piecewise_launch_ms: float = 0.0
    # Shared KV blocks counted once per step (SimReplica._distinct_kv_tokens says when that
    # fits: the offline shared-prefix batch) or once per row reading them (served batches).
    dedup_shared_kv: bool = True

    def step_ms(
        self,
        tokens: int,
        sequences: int,
        context_pairs: float,
        self_pairs: float,
        decode_context: int,
    ) -> float:
        return (
            self.step_base_ms
            + self.token_ms * tokens
            + self.context_pair_ms * context_pairs
            + self.self_pair_ms * self_pairs
            + self.kv_read_ms_per_token * decode_context
            + self.seq_ms * sequences
        )


# Written by `python -m bench.simulator.calibration <file>` (see LatencyModel for the derivation).
# Hold-out check, shared-prefix output tok/s: H100 measured 6,471, simulated 5,999 (-7.3%);
# H200 (`--served bench/results/gpu-cluster-2x-h200-llama3-8b-seed1.json`) measured 7,144,
# simulated 4,971 (-30.4%): that batch of 256 rows on 8 shared prefixes gets the L2 reuse that
# served batches do not show (counting its shared blocks once: +17.2%). Every other offline
# scenario is fitted exactly.
H100_80GB = LatencyModel(
    card="NVIDIA H100 80GB HBM3",
    source="bench/results/offline-llama3-8b-NVIDIA_H100_80GB_HBM3.json",
    step_base_ms=6.67415,
    token_ms=0.0201460,
    context_pair_ms=3.18811e-06,
    self_pair_ms=1.82051e-06,
    kv_read_ms_per_token=4.34607e-05,
    seq_ms=0.0733757,
    eager_launch_ms=19.1,  # not measured on an H100's host: the H200 hosts' median
    piecewise_launch_ms=3.3,  # likewise
)

H200 = LatencyModel(
    card="NVIDIA H200",
    source=(
        "bench/results/offline-llama3-8b-NVIDIA_H200.json"
        " + bench/results/gpu-cluster-2x-h200-llama3-8b-seed1.json"
    ),
    step_base_ms=5.09419,
    token_ms=0.0227247,
    context_pair_ms=3.08569e-06,
    self_pair_ms=1.15308e-06,
    kv_read_ms_per_token=4.15200e-05,
    seq_ms=0.0284462,
    # Median of 60 eager forwards' launch times (quartiles 13.5-22.5 ms) over three H200 hosts,
    # bench/results/profile-mixed*-NVIDIA_H200.txt.
    eager_launch_ms=19.1,
    # Median of 19 piecewise forwards' launch times (2.3-5.7 ms) on two H200 hosts, 2026-11-29,
    # bench/results/profile-mixed-piecewise-NVIDIA_H200.txt.
    piecewise_launch_ms=3.3,
    dedup_shared_kv=False,
)

CARDS: dict[str, LatencyModel] = {"h100": H100_80GB, "h200": H200}
