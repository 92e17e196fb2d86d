"""Time the Triton attention kernels on a GPU against the memory roofline.

    python3 -m kernels.bench_attention            # decode table, split sweep, extend
    python3 -m kernels.bench_attention --quick    # decode table only
    python3 -m kernels.bench_attention --chunks   # short chunks on cached prefixes only

Decode: Llama-3-8B attention (32 heads, 8 KV heads, head_dim 128, bf16, block 16) for batch
1/32/128 at contexts 512/2K/8K. The floor is the bytes it must read (K and V of every
context) over the card's copy bandwidth, measured here with a large device-to-device copy
(bytes read + written). Kernel times come from CUDA-graph replays of many calls, each on a
different slice of a pool larger than L2, so that no call finds its K/V in cache; "eager"
is one Python call with its launch overhead, timed with events; "as32k" launches with host
sizes of a 32K context, as a CUDA graph captured for the longest allowed context does.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

from engine.cuda_graphs import PREFILL_BUCKETS
from kernels.extend_split_launch import choose_extend_splits, split_launch
from kernels.triton_common import num_sms
from kernels.triton_decode import choose_splits, decode_block_n, paged_decode_triton
from kernels.triton_extend import extend_attention_triton, extend_tiles
from kernels.triton_extend_split import extend_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
L2_FLUSH_BYTES = 256 << 20


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting read + write."""
    src = torch.randn(1 << 29, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 31) / statistics.median(times[2:])


def time_graph(calls: list, replays: int = 5) -> float:
    """Median seconds per call over graph replays of all calls."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls:
            call()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def time_eager(call, reps: int = 50) -> float:
    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class DecodeCase:
    """`sets` independent batches over one shuffled pool, so repeated calls miss in L2."""

    def __init__(self, batch: int, context: int, gen: torch.Generator) -> None:
        self.batch, self.context = batch, context
        self.kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
        self.sets = max(1, min(128, -(-L2_FLUSH_BYTES // self.kv_bytes)))
        blocks_per_seq = -(-context // BLOCK)
        num_blocks = self.sets * batch * blocks_per_seq
        self.cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        order = torch.randperm(num_blocks, generator=gen).to(torch.int32).cuda()
        self.tables = order.view(self.sets, batch, blocks_per_seq)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.query = torch.randn(self.sets, batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.out = torch.empty_like(self.query)

    def calls(self, num_splits: int | None = None, repeat: int = 4, host_max: int | None = None) -> list:
        def call(i: int):
            return lambda: paged_decode_triton(
                self.query[i],
                self.cache,
                self.tables[i],
                self.seq_lens,
                host_max or self.context,
                HEAD_DIM**-0.5,
                self.out[i],
                num_splits=num_splits,
            )

        return [call(i % self.sets) for i in range(max(self.sets, 8) * repeat)]


def bench_decode(bandwidth: float, sweep: bool) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    sms = num_sms(torch.device("cuda"))
    lines = [
        "decode, Llama-3-8B attention (32 q / 8 kv heads, d128, bf16, block 16), "
        + torch.cuda.get_device_name(),
        f"{'batch':>5} {'ctx':>5} {'splits':>6} {'KV MB':>8} {'floor us':>9} {'graph us':>9} {'of floor':>8}"
        f" {'GB/s':>6} {'eager us':>9} {'as32k us':>9}",
    ]
    sweep_lines = ["split sweep (graph us; * = heuristic's choice)"]
    for batch in (1, 32, 128):
        for context in (512, 2048, 8192):
            case = DecodeCase(batch, context, gen)
            splits, _ = choose_splits(batch, KV_HEADS, context, sms, decode_block_n(HEAD_DIM, DTYPE))
            seconds = time_graph(case.calls())
            eager = time_eager(case.calls()[0])
            # Launched as a CUDA graph captured for a 32K context would be (host sizes 32K).
            sized = time_graph(case.calls(repeat=2, host_max=32768), replays=3)
            floor = case.kv_bytes / bandwidth
            lines.append(
                f"{batch:>5} {context:>5} {splits:>6} {case.kv_bytes / 1e6:>8.1f} {floor * 1e6:>9.1f}"
                f" {seconds * 1e6:>9.1f} {floor / seconds:>8.0%} {case.kv_bytes / seconds / 1e9:>6.0f}"
                f" {eager * 1e6:>9.1f} {sized * 1e6:>9.1f}"
            )
            if sweep:
                cells = []
                for forced in (1, 2, 4, 8, 16, 32, 64):
                    if forced > 1 and context // forced < 64:
                        continue
                    t = time_graph(case.calls(forced, repeat=2), replays=3)
                    mark = "*" if forced == splits else ""
                    cells.append(f"{forced}{mark}:{t * 1e6:.1f}")
                sweep_lines.append(f"  b{batch:<4} ctx{context:<5} " + "  ".join(cells))
            del case
            torch.cuda.empty_cache()
    return lines + (sweep_lines if sweep else [])


def bench_extend() -> list[str]:
    """Prefill chunks over cached prefixes, against torch SDPA (flash) on contiguous K/V."""
    gen = torch.Generator().manual_seed(1)
    lines = ["extend (bf16, 32 q / 8 kv heads, d128): TFLOP/s counts causal work only"]
    lines.append(f"{'seqs':>4} {'new':>5} {'prefix':>6} {'triton us':>10} {'TFLOP/s':>8} {'sdpa us':>8}")
    for seqs, new, prefix in ((1, 2048, 0), (1, 512, 4096), (4, 1024, 1024), (8, 256, 2048)):
        total = prefix + new
        blocks_per_seq = -(-total // BLOCK)
        num_blocks = seqs * blocks_per_seq
        cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).cuda().view(seqs, blocks_per_seq)
        query = torch.randn(seqs * new, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        seq_lens = torch.full((seqs,), total, dtype=torch.int32, device="cuda")
        starts = torch.arange(0, seqs * new + 1, new, dtype=torch.int32, device="cuda")
        out = torch.empty_like(query)

        call = functools.partial(
            extend_attention_triton, query, cache, tables, seq_lens, starts, seqs, HEAD_DIM**-0.5, out, new
        )
        seconds = time_graph([call] * 10)
        flops = 4 * HEAD_DIM * HEADS * seqs * sum(prefix + j + 1 for j in range(new))
        q4 = torch.randn(seqs, HEADS, new, HEAD_DIM, device="cuda", dtype=DTYPE)
        k4 = torch.randn(seqs, KV_HEADS, total, HEAD_DIM, device="cuda", dtype=DTYPE)
        v4 = torch.randn_like(k4)
        mask = (
            None
            if prefix == 0
            else (
                torch.arange(total, device="cuda")[None, :]
                <= torch.arange(prefix, total, device="cuda")[:, None]
            )
        )

        sdpa = functools.partial(
            torch.nn.functional.scaled_dot_product_attention,
            q4,
            k4,
            v4,
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        reference = time_graph([sdpa] * 10)
        lines.append(
            f"{seqs:>4} {new:>5} {prefix:>6} {seconds * 1e6:>10.1f} {flops / seconds / 1e12:>8.1f}"
            f" {reference * 1e6:>8.1f}"
        )
    return lines


class ChunkCase:
    """One sequence of `new` tokens on a `prefix`-token cached prefix, `sets` copies over one
    shuffled pool (so that repeated calls miss in L2), optionally beside the padding sequence
    the engine's CUDA graph for one-sequence chunks adds (bucket - new fresh tokens; none, over
    one cached token, when the chunk fills its bucket: engine/cuda_graphs.py)."""

    def __init__(self, new: int, prefix: int, bucket: int | None, gen: torch.Generator) -> None:
        self.new, self.prefix, self.bucket = new, prefix, bucket
        lens = [prefix + new] + ([max(bucket - new, 1)] if bucket else [])
        self.query_lens = [new] + ([bucket - new] if bucket else [])
        self.tokens = sum(self.query_lens)
        per_set = sum(lens) * KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
        self.sets = max(2, min(16, -(-L2_FLUSH_BYTES // per_set)))
        blocks = [-(-n // BLOCK) for n in lens]
        width = max(blocks)
        order = torch.randperm(self.sets * sum(blocks), generator=gen).to(torch.int32)
        tables = torch.zeros(self.sets, len(lens), width, dtype=torch.int32)
        used = 0
        for i in range(self.sets):
            for j, count in enumerate(blocks):
                tables[i, j, :count] = order[used : used + count]
                used += count
        self.tables = tables.cuda()
        self.cache = torch.randn(2, used, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        starts = [0]
        for q in self.query_lens:
            starts.append(starts[-1] + q)
        self.starts = torch.tensor(starts, dtype=torch.int32, device="cuda")
        self.query = torch.randn(self.sets, self.tokens, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.out = torch.empty_like(self.query)
        # Host sizes: exact, or the graph's (a bucket - 1 token chunk, a 32K context).
        self.max_query_len = bucket - 1 if bucket else new
        self.max_seq_len = 32768 if bucket else prefix + new

    def calls(self, **options) -> list:
        def call(i: int):
            return lambda: extend_attention(
                self.query[i],
                self.cache,
                self.tables[i],
                self.seq_lens,
                self.starts,
                len(self.query_lens),
                HEAD_DIM**-0.5,
                self.out[i],
                self.max_query_len,
                self.max_seq_len,
                **options,
            )

        return [call(i % self.sets) for i in range(max(self.sets, 8) * 2)]

    def splits(self) -> int:
        sms = num_sms(torch.device("cuda"))
        group = HEADS // KV_HEADS
        _, bq, bm, _, _ = extend_tiles(group, HEAD_DIM, DTYPE, self.max_query_len)
        launch, _ = split_launch(group, HEAD_DIM, DTYPE, self.max_query_len, torch.device("cuda"))
        _, split_q, split_m, _, _ = launch
        return choose_extend_splits(
            self.tokens, len(self.query_lens), KV_HEADS, self.max_seq_len, sms, (bq, bm), (split_q, split_m)
        )

    def max_error(self, **options) -> float:
        """Relative error of a variant against the unsplit kernel on set 0's chunk."""
        self.calls(num_splits=1)[0]()
        before = self.out[0, : self.new].float().clone()
        self.calls(**options)[0]()
        after = self.out[0, : self.new].float()
        return ((after - before).norm() / before.norm()).item()


def bench_chunks() -> list[str]:
    """Time-to-first-token's attention: one sequence, q new tokens on a cached prefix, graph
    replays; before = the unsplit kernel, after = the split heuristic (64-row split tiles), and
    the same with 128-row split tiles where the unsplit kernel takes them."""
    gen = torch.Generator().manual_seed(2)
    lines = [
        "extend chunks, Llama-3-8B attention (32 q / 8 kv heads, d128, bf16, block 16), graph us per call;"
        " exact = host sizes of the chunk, graph = the engine's bucket + padding sequence sized for 32K",
        f"{'new':>4} {'prefix':>6} {'launch':>6} {'splits':>6} {'before':>8} {'after':>8} {'speedup':>7}"
        f" {'TFLOP/s':>7} {'128-row':>8} {'err':>8}",
    ]
    for new in (16, 128, 512):
        for prefix in (0, 2048, 8192):
            for graph in (False, True):
                bucket = next(b for b in PREFILL_BUCKETS if b >= new) if graph else None
                case = ChunkCase(new, prefix, bucket, gen)
                before = time_graph(case.calls(num_splits=1))
                after = time_graph(case.calls())
                wide = time_graph(case.calls(block_m=128))
                error = max(case.max_error(), case.max_error(block_m=128))
                flops = 4 * HEAD_DIM * HEADS * sum(prefix + j + 1 for j in range(new))
                lines.append(
                    f"{new:>4} {prefix:>6} {'graph' if graph else 'exact':>6} {case.splits():>6}"
                    f" {before * 1e6:>8.1f} {after * 1e6:>8.1f} {before / after:>6.2f}x"
                    f" {flops / after / 1e12:>7.1f} {wide * 1e6:>8.1f} {error:>8.1e}"
                )
                del case
    # Split sweep for the case that motivated the split (TTFT of 128 tokens on 8K cached).
    for graph in (False, True):
        case = ChunkCase(128, 8192, 128 if graph else None, gen)
        cells = []
        for block_m in (128, 64):
            for forced in (2, 4, 8, 16, 32):
                t = time_graph(case.calls(num_splits=forced, block_m=block_m), replays=3)
                cells.append(f"{block_m}r/{forced}:{t * 1e6:.1f}")
        lines.append(
            f"sweep 128 on 8192 ({'graph' if graph else 'exact'}, rows/splits:us) " + "  ".join(cells)
        )
        del case
    torch.cuda.empty_cache()
    return lines


def tune_split() -> list[str]:
    """The split kernel's key tile, pipeline depth, warps and split count for the TTFT case
    (128 new tokens on 8,192 cached), ranked; each variant checked against the unsplit kernel."""
    gen = torch.Generator().manual_seed(3)
    lines = ["tune: 128 new on 8,192 cached, us per call per layer (graph replays); default first"]
    for graph in (False, True):
        case = ChunkCase(128, 8192, 128 if graph else None, gen)
        default = time_graph(case.calls(), replays=5)
        timed: list[tuple[float, str]] = []
        for block_m in (64, 128):
            for block_n in (32, 64, 128):
                for stages in (2, 3, 4):
                    for warps in (4, 8):
                        for splits in (3, 4, 5, 6, 8):
                            options = {
                                "num_splits": splits,
                                "block_m": block_m,
                                "block_n": block_n,
                                "num_stages": stages,
                                "num_warps": warps,
                            }
                            name = f"m{block_m} n{block_n} s{stages} w{warps} x{splits}"
                            try:
                                error = case.max_error(**options)
                                t = time_graph(case.calls(**options), replays=3)
                            except Exception as err:  # out of shared memory or registers
                                lines.append(f"  {name}: {type(err).__name__}")
                                continue
                            if error > 1e-2:
                                lines.append(f"  {name}: wrong (relative error {error:.1e})")
                                continue
                            timed.append((t, name))
        timed.sort()
        launch = "graph" if graph else "exact"
        lines.append(
            f"{launch}: default {default * 1e6:.1f} us; best: "
            + ", ".join(f"{name} {t * 1e6:.1f}" for t, name in timed[:12])
        )
        del case
    torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunks", action="store_true")
    parser.add_argument("--tune", action="store_true", help="sweep the split kernel's launch options")
    args = parser.parse_args()
    if args.tune:
        print("\n".join(tune_split()), flush=True)
        return
    if args.chunks:
        print("\n".join(bench_chunks()), flush=True)
        return
    bandwidth = copy_bandwidth()
    lines = [f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)"]
    lines += bench_decode(bandwidth, sweep=not args.quick)
    if not args.quick:
        lines += bench_extend()
        lines += bench_chunks()
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
