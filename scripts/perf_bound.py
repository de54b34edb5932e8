#!/usr/bin/env python3
"""A lower bound on the time of every headline op, from the compiled code alone (no GPU).

Reads what build.rs leaves in OUT_DIR/cuda: the ptxas report of every kernels/*.cu and kernels/sm90/*.cu
(registers, shared memory, spills) and its fatbin (SASS, disassembled with cuobjdump; the sm90 files' sm_90a
code is listed under sm_90). For each kernel and each of sm_80 and
sm_90 it prints the resources, the occupancy they allow, and the instruction mix of the kernel's hot loop
(of the innermost loops that hold the most HMMA/FFMA, the one with the shortest path). For each headline
target (src: the design's targets, H100 bf16) it bounds each launch of the op from below by the largest of

  - tensor time: the HMMA instructions the shape executes x 4096 flops / the tensor peak;
  - issue time: the instructions one full iteration of the hot loop executes at least (of the paths
    through its body that do the most math, the shortest) x its trip count (from the shape) x warps, over (SMs the grid can occupy x 4
    schedulers x clock); only the hot loop is counted;
  - memory time: the bytes the launch must move at least once / the HBM bandwidth;

and the op by the sum over its launches. A bound proves a miss (verdict MISS: even the bound exceeds the
target); it never proves a hit (verdict open: only a GPU can say met).

Usage: perf_bound.py --cuda-dir OUT_DIR/cuda --cuobjdump PATH [--markdown]
"""
import argparse
import math
import os
import re
import subprocess
import sys
from collections import Counter

# ---- hand-entered peaks: the only numbers not read from the compiled code, each with its source ----
DEVICES = {
    "sm_90": dict(
        name="H100 SXM5 (sm_90)",
        sms=132,  # PyTorch's multiprocessor count on the H100 measured for this project
        clock=1.98e9,  # H100 SXM5 boost clock, NVIDIA H100 datasheet (1980 MHz)
        tensor=989e12,  # dense bf16 tensor peak, NVIDIA H100 datasheet; mma.sync reaches less on
        # Hopper (wgmma only gets near it), so using it makes the bound looser, never wrong
        hbm=3.0e12,  # device-to-device copy measured on that H100 (bytes read + written per second)
        cublas=798e12,  # cuBLAS bf16 8192^3 GEMM measured on that H100
        # the rate L2 feeds the SMs in bytes/s (the perf table prints "L2 read" in GB/s: enter GB/s x 1e9);
        # not measured yet. What the probe reached, L2 may deliver more: a MISS from this term alone wants
        # ncu's lts throughput (scripts/gpu-profile.sh) to confirm it
        l2=None,
        measured=True,
        regs=65536, smem=233472, threads=2048, blocks=32,
        source="peaks: H100 SXM5 datasheet (989 TF/s dense bf16, 1980 MHz); measured on an H100 80GB HBM3, "
        "driver 580: 132 SMs, 3.0 TB/s device-to-device copy, cuBLAS 798 TF/s at 8192^3",
    ),
    "sm_80": dict(
        name="A100 SXM4 80GB (sm_80)",
        sms=108,  # NVIDIA A100 Tensor Core GPU Architecture whitepaper
        clock=1.41e9,  # A100 boost clock, same whitepaper (1410 MHz)
        tensor=312e12,  # dense bf16 tensor peak, same whitepaper
        hbm=2.039e12,  # A100 80GB SXM HBM2e bandwidth, NVIDIA A100 datasheet
        cublas=312e12,  # not measured: cuBLAS taken at the tensor peak, so the targets are stricter
        measured=False,
        regs=65536, smem=167936, threads=2048, blocks=32,
        source="peaks: NVIDIA A100 whitepaper and 80GB SXM datasheet (108 SMs, 1410 MHz, 312 TF/s dense bf16, "
        "2.039 TB/s); no cuBLAS or copy was measured on an A100, so the targets take the baselines at "
        "those peaks, the strictest case, and a MISS holds only while the real baseline reaches more than "
        "the share of its peak the verdict names",
    ),
}

THREADS = 256  # the block of every kernel but those below (LK_FUSED_GEMM_THREADS, LK_SIMT_THREADS)
# Filled from kernels/include/lora_params.h by read_params_h: the block sizes of the kernels that do not run
# THREADS, the dynamic shared memory of those that use it (the SIMT kernels use static shared memory), the
# sm_90a GEMM's tile
THREADS_OF = {}
DYN_SMEM = {}
# kernels/sm90/*.cu: built for sm_90a alone; their rows go with sm_90's
HOPPER_ARCH = {"sm_90": "sm_90a"}
SM90_BM = SM90_BN = SM90_BK = SM90_NARROW_BN = SM90_NARROW_SMEM = SM90_T_MAX_RANK = 0
FUSED_BM = FUSED_BN = FUSED_NARROW_BN = FUSED_NARROW_SMEM = 0  # the mma.sync fused GEMM's tiles
SM90_T_SMEM = {}  # fused_gemm_t<TN>_sm90[_narrow]: (TN, narrow) -> dynamic shared memory
SM90_U_SMEM = {}  # fused_gemm_u<TN>_sm90_nn[_narrow]: (TN, narrow) -> dynamic shared memory
SM90_CONSUMER_WARPS = 8  # two consumer warpgroups


def read_params_h(path):
    """The launch constants the bound needs, from the header the kernels and the Rust side share."""
    global SM90_BM, SM90_BN, SM90_BK, SM90_NARROW_BN, SM90_NARROW_SMEM, SM90_T_MAX_RANK
    global FUSED_BM, FUSED_BN, FUSED_NARROW_BN, FUSED_NARROW_SMEM
    with open(path) as fh:
        d = {k: int(v) for k, v in re.findall(r"#define (LK_\w+) (\d+)u", fh.read())}
    FUSED_BM, FUSED_BN = d["LK_FUSED_GEMM_BM"], d["LK_FUSED_GEMM_BN"]
    FUSED_NARROW_BN, FUSED_NARROW_SMEM = d["LK_FUSED_GEMM_NARROW_BN"], d["LK_FUSED_GEMM_NARROW_SMEM_BYTES"]
    THREADS_OF.update(multi_decode=d["LK_MULTI_DECODE_THREADS"], fused_gemm_sm90=d["LK_SM90_THREADS"],
                      fused_gemm_t_sm90=d["LK_SM90_THREADS"])
    DYN_SMEM.update(fused_gemm=d["LK_FUSED_GEMM_SMEM_BYTES"], fused_gemm_multi=d["LK_FUSED_GEMM_SMEM_BYTES"],
                    multi_decode=d["LK_MULTI_DECODE_SMEM_BYTES"], fused_gemm_sm90=d["LK_SM90_SMEM_BYTES"])
    SM90_BM, SM90_BN, SM90_BK = d["LK_SM90_BM"], d["LK_SM90_BN"], d["LK_SM90_BK"]
    SM90_NARROW_BN, SM90_NARROW_SMEM = d["LK_SM90_NARROW_BN"], d["LK_SM90_NARROW_SMEM_BYTES"]
    SM90_T_MAX_RANK = d["LK_SM90_T_MAX_RANK"]
    SM90_T_SMEM.update({(16, False): d["LK_SM90_T16_SMEM_BYTES"], (32, False): d["LK_SM90_T32_SMEM_BYTES"],
                        (16, True): d["LK_SM90_T16_NARROW_SMEM_BYTES"],
                        (32, True): d["LK_SM90_T32_NARROW_SMEM_BYTES"]})
    # dX's kernels also hold T's and U's row-block tiles for dB's and dA's partials (U32: narrow alone)
    SM90_U_SMEM.update({(16, False): d["LK_SM90_U16_SMEM_BYTES"], (16, True): d["LK_SM90_U16_NARROW_SMEM_BYTES"],
                        (32, True): d["LK_SM90_U32_NARROW_SMEM_BYTES"]})


def sm90_bn(m, n, sms):
    """The tile width ops::sm90_tile (src/ops/sm90.rs) picks: narrow where the busiest SM has less work."""
    busiest = lambda bn: cdiv(cdiv(m, SM90_BM) * cdiv(n, bn), sms)
    return SM90_NARROW_BN if busiest(SM90_NARROW_BN) < 2 * busiest(SM90_BN) else SM90_BN


def sm90_kernel(nn, bn, dtype="bf16"):
    return f"fused_gemm_sm90{'_nn' if nn else ''}{'_narrow' if bn == SM90_NARROW_BN else ''}_{dtype}"


def threads_of(kernel_file):
    return THREADS_OF.get(kernel_file, THREADS)
GRAD_TM, GRAD_TC, GRAD_STAGES = 32, 128, 3  # LK_GRAD_TM, LK_GRAD_TC, LK_GRAD_STAGES


def grad_class(kernel):
    """lowrank_grad[_u]_r<class>_<dtype>: (rank class, with U)."""
    m = re.match(r"lowrank_grad(_u)?_r(\d+)_", kernel)
    return int(m.group(2)), m.group(1) is not None


def dyn_smem(kernel, kernel_file):
    """Dynamic shared memory of a launch (src/ops/launch.rs lowrank_grad_smem for lowrank_grad)."""
    if kernel_file == "lowrank_grad":
        rp, with_u = grad_class(kernel)
        ring = GRAD_STAGES * GRAD_TM * ((GRAD_TC + 8) + (rp + 8))
        return 2 * (ring + (GRAD_TC * (rp + 8) if with_u else 0))
    if kernel_file == "fused_gemm_sm90" and "_narrow_" in kernel:
        return SM90_NARROW_SMEM
    if kernel_file in ("fused_gemm", "fused_gemm_multi") and "_narrow_" in kernel:
        return FUSED_NARROW_SMEM
    if kernel_file == "fused_gemm_t_sm90":
        # fused_gemm_t<TN>_sm90* (the forward, T inside) and fused_gemm_u<TN>_sm90_nn* (dX, U, dB's and dA's
        # partials inside, with T's and U's tiles)
        key = (int(re.match(r"fused_gemm_[tu](\d+)_", kernel).group(1)), "_narrow_" in kernel)
        return (SM90_U_SMEM if kernel.startswith("fused_gemm_u") else SM90_T_SMEM)[key]
    return DYN_SMEM.get(kernel_file, 0)
HMMA_FLOPS = 2 * 16 * 8 * 16  # one m16n8k16

CLASSES = ["HMMA", "HGMMA", "LDSM", "LDGSTS", "LDG", "STG", "LDS", "STS", "FFMA", "BAR", "other"]


def op_class(op):
    base = op.split(".")[0]
    if base in ("HMMA", "HGMMA", "LDSM", "LDGSTS", "LDG", "STG", "LDS", "STS", "FFMA", "BAR"):
        return base
    return "other"


# ---- reading the compiled code ----

def ptxas_resources(report_text):
    """{(kernel, arch): dict(regs, smem, spill_stores, spill_loads)} from a -Xptxas=-v report."""
    out, cur, spills = {}, None, (0, 0)
    for line in report_text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'", line)
        if m:
            cur = (m.group(1), m.group(2))
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            spills = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers(.*)", line)
        if m and cur:
            smem = re.search(r"(\d+) bytes smem", m.group(2))
            out[cur] = dict(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0,
                            spill_stores=spills[0], spill_loads=spills[1])
            cur = None
    return out


def sass_functions(cuobjdump, fatbin, arch):
    """{kernel: [(address, opcode, branch target or None, predicated)]} for one architecture of a fatbin."""
    text = subprocess.run([cuobjdump, "-sass", "-arch", arch, fatbin], check=True, capture_output=True,
                          text=True).stdout
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if m and cur is not None:
            target = None
            if m.group(3).split(".")[0] in ("BRA", "BRX", "JMP"):
                t = re.search(r"0x([0-9a-f]+)", m.group(4))
                target = int(t.group(1), 16) if t else None
            cur.append((int(m.group(1), 16), m.group(3), target, m.group(2) is not None))
    return funcs


MATH = ("HMMA", "HGMMA", "FFMA")


def min_path(insts, a, b):
    """What one full iteration of the loop [a, b] executes at least: of the paths from its head to its
    back-edge branch (through its forward branches, both ways for predicated ones), those that execute
    the most math (HMMA/HGMMA/FFMA: the loop's work; ptxas guards unrolled copies of a source loop with
    branches that only the last trip takes), and of those the shortest. Counting this path, not the
    whole body, keeps the issue-time bound a lower bound per unit of work."""
    body = [i for i in insts if a <= i[0] <= b]
    index = {i[0]: n for n, i in enumerate(body)}
    # the body of an innermost loop is acyclic apart from its back edge: a DP in address order
    best = {0: ((1 if op_class(body[0][1]) in MATH else 0), -1)}  # node -> (math, -length)
    prev = {0: None}
    for n in range(len(body) - 1):
        if n not in best:
            continue
        addr, op, target, pred = body[n]
        base = op.split(".")[0]
        succ = []
        if base in ("BRA", "BRX", "JMP"):
            if target in index and target != a and index[target] > n:
                succ.append(index[target])
            if pred:
                succ.append(n + 1)
        elif base in ("EXIT", "RET"):
            if pred:
                succ.append(n + 1)
        else:
            succ.append(n + 1)
        for s_ in succ:
            math_, neg_len = best[n]
            cand = (math_ + (1 if op_class(body[s_][1]) in MATH else 0), neg_len - 1)
            if s_ not in best or cand > best[s_]:
                best[s_] = cand
                prev[s_] = n
    last = len(body) - 1
    if last not in prev:
        return body
    path, n = [], last
    while n is not None:
        path.append(body[n])
        n = prev[n]
    return path


def hot_loop(insts):
    """The hot loop: the innermost loop (a backward branch's range) with the most HMMA + FFMA on its
    path (see min_path); among loops with as many, the one whose path is shortest (a kernel may carry
    several copies of its main loop, fused_gemm one per phase, interior or edge tiles, vector or element
    loads, and which one a launch runs depends on the shapes: counting the cheapest keeps the issue
    bound a lower bound whichever it is); with no math at all, the largest body (not the trap loop after
    EXIT). Returns the class counts of the fewest instructions one of its iterations executes, and the
    size of its whole body."""
    loops = [(tgt, addr) for addr, _, tgt, _ in insts if tgt is not None and tgt <= addr]
    inner = [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    best = None
    for a, b in inner:
        path = min_path(insts, a, b)
        mix = Counter(op_class(i[1]) for i in path)
        mix["total"] = len(path)
        mix["body"] = sum(1 for i in insts if a <= i[0] <= b)
        work = mix["HMMA"] + mix["HGMMA"] + mix["FFMA"]
        key = (work, -mix["total"] if work else mix["body"])
        if best is None or key > best[0]:
            best = (key, mix)
    if best is None:  # straight-line kernel: the whole function, run once
        mix = Counter(op_class(i[1]) for i in insts)
        mix["total"] = mix["body"] = len(insts)
        return mix
    return best[1]


def occupancy(res, kernel, kernel_file, dev):
    """Blocks per SM (registers, shared memory, threads, block limit)."""
    regs_per_warp = math.ceil(max(res["regs"], 1) * 32 / 256) * 256
    threads = threads_of(kernel_file)
    by_regs = dev["regs"] // (regs_per_warp * threads // 32)
    smem = res["smem"] + dyn_smem(kernel, kernel_file) + 1024  # 1 KB reserved per block (sm_80+)
    by_smem = dev["smem"] // smem
    return min(by_regs, by_smem, dev["threads"] // threads, dev["blocks"])


# ---- the headline ops, launch by launch (mirrors src/ops/lora.rs and src/ops/launch.rs) ----

def cdiv(a, b):
    return -(-a // b)


def grad_splits(m, tiles):  # src/ops/launch.rs grad_splits
    want = max(cdiv(264, tiles), 1)
    most = max(cdiv(m, 64), 1)
    splits = min(want, most)
    rows = cdiv(cdiv(m, splits), 32) * 32
    return cdiv(m, rows), rows


FUSED_AHEAD = 2  # fused_gemm's STAGES - 1: per phase, the last this many tiles are not run by its loop


def fused_loop_trips(low_tiles, main_tiles):
    """fused_gemm's k-tiles run by its two loops (low-rank, then main); the at most FUSED_AHEAD tiles at
    the end of each phase are unrolled straight-line code, not counted (like the prologue)."""
    return max(low_tiles - FUSED_AHEAD, 0) + max(main_tiles - FUSED_AHEAD, 0)


def mma_bn(m, n, splits, sms):
    """The tile width ops::mma_tile (src/ops/launch.rs) picks for the mma.sync fused GEMM: 64 columns (the
    "_narrow" kernels) where they at least halve the busiest SM's work, counting a split's blocks per tile."""
    busiest = lambda bn: cdiv(cdiv(m, FUSED_BM) * cdiv(n, bn) * splits, sms)
    return FUSED_NARROW_BN if busiest(FUSED_NARROW_BN) <= busiest(FUSED_BN) else FUSED_BN


def fused_kernel(name, bn):
    """fused_gemm_{nt,nn,multi}_<dtype>[_f32ad] at the width bn: the "_narrow" kernel at 64 columns."""
    if bn == FUSED_BN:
        return name
    family, rest = re.match(r"(fused_gemm_(?:n[nt]|multi))_(.*)", name).groups()
    return f"{family}_narrow_{rest}"


def launch_fused(name, m, n, k, r, sms):
    """fused_gemm: 128x128 tiles (or 128x64, the width mma_bn picks), 8 warps, ceil(r/32) + ceil(k/32)
    k-tiles of 32 HMMA per warp each (16 on the narrow tiles)."""
    bn = mma_bn(m, n, 1, sms)
    blocks = cdiv(n, bn) * cdiv(m, FUSED_BM)
    return dict(kernel=fused_kernel(name, bn), file="fused_gemm", blocks=blocks, iters=cdiv(r, 32) + cdiv(k, 32),
                loop_iters=fused_loop_trips(cdiv(r, 32), cdiv(k, 32)), slots=bn // 4, slot="HMMA",
                bytes=2 * (m * k + n * k + m * r + n * r + m * n))


PROJECTION_PER_SPLIT = 1024  # src/ops/launch.rs projection_splits: K chunks of the projection, from K alone


def launch_grad(name, fin, m, rows, cols, sms):
    """A split reduction over m (src/ops/launch.rs split_reduction): the projection T on the "nt" fused
    GEMM; 128x128 tiles of the rows x cols result (128x64 where mma_bn takes them: at cols = r <= 64
    always), m (= K) split into fixed chunks of PROJECTION_PER_SPLIT (grid z); per warp ceil(chunk/32)
    k-tiles of 32 HMMA (16 on the narrow tiles); then lowrank_finalize adds the f32 partials in order.
    At rows <= 128 over several chunks, multi_decode_shrink instead (small_projection)."""
    splits, per = max(cdiv(m, PROJECTION_PER_SPLIT), 1), PROJECTION_PER_SPLIT
    if rows <= FUSED_BM and splits > 1:  # src/ops/launch.rs small_projection (no dropout): the small-batch
        # shrink with one adapter, a block per 32 columns, 16-row group and chunk, 2 HMMA per k-tile per warp
        partial = 4 * splits * rows * cols
        dtype = "f16" if "_f16" in name else "bf16"
        return [dict(kernel="multi_decode_shrink_" + dtype + ("_f32ad" if name.endswith("_f32ad") else ""),
                     file="multi_decode",
                     blocks=cdiv(cols, 32) * cdiv(rows, 16) * splits, iters=cdiv(per, 32), slots=2, slot="HMMA",
                     bytes=2 * m * (rows + cols) + partial),
                launch_finalize(fin, rows * cols, splits, partial)]
    bn = mma_bn(rows, cols, splits, sms)
    tiles = cdiv(rows, FUSED_BM) * cdiv(cols, bn)
    partial = 4 * splits * rows * cols if splits > 1 else 0
    low_tiles = cdiv(per if splits > 1 else m, 32)
    out = [dict(kernel=fused_kernel(name, bn), file="fused_gemm", blocks=tiles * splits, iters=low_tiles,
                loop_iters=fused_loop_trips(low_tiles, 0), slots=bn // 4, slot="HMMA",
                bytes=2 * m * (rows + cols) + (partial or 2 * rows * cols))]
    if splits > 1:
        out.append(launch_finalize(fin, rows * cols, splits, partial))
    return out


def launch_lowrank_grad(dtype, fin, m, cols, r, with_u):
    """lowrank_grad (src/ops/launch.rs lowrank_grad): a block per 128-column strip of G (m x cols) and
    fixed token chunk (grad_splits over the strips); per 32-row step, P = G^T L for 16 columns x the rank
    class per warp (2 k16 steps x class/8 HMMA) and, in the "_u" kernels, Q = G R for the step's rows
    (2 x class/8 mma tiles of 8 HMMA over the warps: at class 16 only 4 warps have one). Then
    lowrank_finalize adds P's chunks (and Q's strips, for U) in order."""
    rp = 16 if r <= 16 else 32 if r <= 32 else 64 if r <= 64 else 128
    nt = rp // 8
    kern = f"lowrank_grad{'_u' if with_u else ''}_r{rp}_{dtype}"
    strips = cdiv(cols, GRAD_TC)
    splits, per = grad_splits(m, strips)
    blocks = strips * splits
    steps = cdiv(per, GRAD_TM)
    p_part = 4 * splits * cols * r
    q_part = 4 * strips * m * r if with_u else 0
    # HMMA per block and step, exactly: P 8 warps x 2 x nt, Q 2 x nt tiles x 8 k16 steps
    hmma = blocks * steps * (8 * 2 * nt + (2 * nt * 8 if with_u else 0))
    # issue: the hot loop's (fullest) path, counted for the warps that take it (with U: the warps that have
    # a Q tile, min(8, 2 nt) per block; the others run a shorter path, not counted)
    issue_warps = blocks * (min(8, 2 * nt) if with_u else 8)
    out = [dict(kernel=kern, file="lowrank_grad", blocks=blocks, iters=steps, slots=None, slot="HMMA",
                hmma=hmma, issue_warps=issue_warps,
                bytes=2 * (m * cols + m * r + (cols * r if with_u else 0)) + p_part + q_part)]
    out += [launch_finalize(fin, count, n, part)
            for part, count, n in ((p_part, cols * r, splits), (q_part, m * r, strips)) if part]
    return out


def launch_finalize(name, count, splits, partial_bytes):
    """lowrank_finalize: each thread adds the splits of its elements (a grid-stride loop over count, at most
    4096 blocks), one LDG per split and element; the hot loop is the split loop as ptxas unrolled it."""
    blocks = min(cdiv(count, 256), 4096)
    return dict(kernel=name, file="lowrank_finalize", blocks=blocks, iters=splits * cdiv(count, 256 * blocks),
                slots=1, slot="LDG", bytes=partial_bytes + 2 * count)


MERGE_RANK_CHUNK = 16  # kChunk in kernels/merge.cu: rank steps per trip of its chunk loop


def launch_merge(name, n, k, r):
    """merge: 64x128 tile per block (LK_MERGE_ROWS x LK_MERGE_COLS); each thread 4 rows x 8 columns, 32 FFMA
    per rank step; the rank is padded to a multiple of 16 (one trip of the chunk loop per 16 steps, which
    stages A and B and runs the 16 steps unrolled)."""
    return dict(kernel=name, file="merge", blocks=cdiv(k, 128) * cdiv(n, 64),
                iters=cdiv(r, MERGE_RANK_CHUNK) * MERGE_RANK_CHUNK, slots=32, slot="FFMA",
                bytes=2 * 2 * n * k + 2 * r * (n + k))


def launch_dora_merge(n, k, r):
    """DoRA merge (src/ops/dora.rs): the merge kernel's norm pass (reads W, writes f32 partial sums of
    squares per row and 128-column block), dora_factor_f32 (one thread per row adds its partials: one
    LDG per block), then the merge kernel again with the row factors (reads and writes W); both merge
    passes run the rank product."""
    blocks_k = cdiv(k, 128)
    norm = launch_merge("dora_merge_bf16", n, k, r)
    norm["bytes"] = 2 * n * k + 2 * r * (n + k) + 4 * n * blocks_k
    factor = dict(kernel="dora_factor_f32", file="merge", blocks=cdiv(n, 256), iters=blocks_k, slots=1,
                  slot="LDG", bytes=4 * n * blocks_k + 8 * n)
    scale = launch_merge("dora_merge_bf16", n, k, r)
    scale["bytes"] += 4 * n
    return [norm, factor, scale]


DORA_ROWS = 64  # LK_DORA_ROWS: rows per block of kernels/dora.cu's column passes


def dora_layer_extra(m, n, k, r):
    """DoRA's unmerged layer (src/ops/dora_layer.rs) beyond the plain LoRA forward and backward: the
    forward adds the DoRA merge's norm pass and factor kernel (with the norms) and dora_scale (reads Z,
    writes Y: one FFMA per element, a block of 256 columns x 64 rows); the backward adds dora_grad (reads
    dY and Z, writes dZ and f32 partials per 64 rows) and dora_magnitude_grad_f32 (one thread per column
    adds its partials)."""
    norm, factor, _ = launch_dora_merge(n, k, r)
    factor["bytes"] += 4 * n
    blocks = cdiv(m, DORA_ROWS) * cdiv(n, 256)
    scale = dict(kernel="dora_scale_bf16", file="dora", blocks=blocks, iters=DORA_ROWS, slots=1, slot="FFMA",
                 bytes=2 * 2 * m * n + 6 * n)
    grad = dict(kernel="dora_grad_bf16", file="dora", blocks=blocks, iters=DORA_ROWS, slots=1, slot="FFMA",
                bytes=3 * 2 * m * n + 4 * n * cdiv(m, DORA_ROWS) + 4 * n)
    dm = dict(kernel="dora_magnitude_grad_f32", file="dora", blocks=cdiv(n, 256), iters=cdiv(m, DORA_ROWS),
              slots=1, slot="LDG", bytes=4 * n * cdiv(m, DORA_ROWS) + 12 * n)
    return [norm, factor, scale], [grad, dm]


def dora_dropout_extra(m, n, k, r, sms):
    """DoRA's layer with LoRA dropout beyond dora_layer_extra's launches: the forward adds
    dropout_residual (X - dropout(X): reads X, writes the residual, one Philox call per 4 elements, a
    grid-stride loop of at most 65536 blocks), the plain GEMM D = residual W0^T (the fused GEMM at rank 0)
    and, in dora_scale, a read of D and a write of Z - D; the backward with dX adds, in dora_grad, a write
    of (1 - f) dY, the plain GEMM of it with W0 (nn, rank 0) and dropout_residual accumulating into dX
    (reads the product and dX, writes dX). The plain LoRA launches with dropout are counted as without
    (the mask's generator in the projection and dX's epilogue is not modelled)."""
    fwd, bwd = dora_layer_extra(m, n, k, r)
    fwd, bwd = [dict(l) for l in fwd], [dict(l) for l in bwd]
    fwd[2]["bytes"] += 2 * 2 * m * n  # dora_scale: D read, Z - D written
    bwd[0]["bytes"] += 2 * m * n  # dora_grad: (1 - f) dY written
    groups = cdiv(m * k, 4)
    blocks = min(cdiv(groups, 256), 65536)

    def residual(accumulate):
        return dict(kernel="dropout_residual_bf16", file="dora", blocks=blocks, iters=cdiv(groups, 256 * blocks),
                    slots=1, slot=None, bytes=(3 if accumulate else 2) * 2 * m * k)
    fwd += [residual(False), launch_fused("fused_gemm_nt_bf16", m, n, k, 0, sms)]
    bwd += [launch_fused("fused_gemm_nn_bf16", m, k, n, 0, sms), residual(True)]
    return fwd, bwd


def merge_ranks():
    """Not headline targets: the merge of the headline shape (4096^2, bf16) at larger ranks, where the rank
    product (r x n x k FFMA) grows while the bytes stay those of W."""
    return [(r, launch_merge("merge_bf16", 4096, 4096, r)) for r in (16, 32, 64, 128)]


def small_m_splits(n, k, r):  # src/ops/launch.rs small_m_splits
    blocks = cdiv(cdiv(n, 16) + cdiv(r, 16), 2)
    fewest = max(cdiv(k, 1024), 1)
    most = max(cdiv(k, 256), fewest)
    splits = min(max(cdiv(264, blocks), fewest), most)
    per = cdiv(cdiv(k, splits), 32) * 32
    return cdiv(k, per), per, blocks


def launch_small_m(name, fin, m, n, k, r):
    """small_m: 16-row tiles of [W0; A], 2 per block, 4 warps per tile splitting the block's k range
    (split over blocks too, grid y) in 32-wide steps of 4 HMMA; then small_m_finalize adds the splits:
    T, then Y = sums + s*T*B^T (r FFMA per output, m/4 outputs per thread of a 64-column block)."""
    splits, per, blocks = small_m_splits(n, k, r)
    partial = 4 * splits * m * (n + r)
    return [dict(kernel=name, file="small_m", blocks=blocks * splits, iters=cdiv(cdiv(per, 32), 4), slots=4,
                 slot="HMMA", bytes=2 * (n * k + r * k + m * k) + partial),
            dict(kernel=fin, file="small_m", blocks=cdiv(n, 64), iters=r * cdiv(m, 4), slots=1, slot="FFMA",
                 bytes=partial + 2 * (n * r + m * n + m * r))]


def headline_ops(sms):
    M, N, K, R = 8192, 4096, 4096, 16
    gemm = 2 * M * N * K
    # T = X·Aᵀ and U = dY·B are the fused GEMM with N = r (src/ops/launch.rs project)
    # (split over the inner dimension like the gradients when the M x r tiles cannot fill the GPU)
    fwd = launch_grad("fused_gemm_nt_bf16", "lowrank_finalize_bf16", K, M, R, sms)
    fwd.append(launch_fused("fused_gemm_nt_bf16", M, N, K, R, sms))
    # dB = s dY^T T and U = dY B in one pass over dY, then dA = s U^T X in one over X
    bwd = launch_lowrank_grad("bf16", "lowrank_finalize_bf16", M, N, R, True)
    bwd += launch_lowrank_grad("bf16", "lowrank_finalize_bf16", M, K, R, False)
    bwd.append(launch_fused("fused_gemm_nn_bf16", M, K, N, R, sms))  # dX = dY W0 + s U A
    merge = [launch_merge("merge_bf16", N, K, R)]
    small = launch_small_m("small_m_bf16", "small_m_finalize_bf16", 16, N, K, R)  # T rides along with W0
    w_bytes = 2 * N * K
    return [
        ("forward <= 1.03x cuBLAS bare GEMM (M=8192, N=K=4096, r=16)", "lora_forward", fwd,
         lambda d: 1.03 * gemm / d["cublas"]),
        ("backward <= 0.52x cuBLAS full fine-tune backward (dX + dW)", "lora_backward", bwd,
         lambda d: 0.52 * 2 * gemm / d["cublas"]),
        ("merge >= 90% of device-to-device copy bandwidth (4096^2, r=16)", "merge", merge,
         lambda d: 2 * w_bytes / d["hbm"] / 0.90),
        ("M=16 forward >= 85% of HBM bandwidth streaming W0 (N=K=4096, r=16)", "lora_forward (small-M)", small,
         lambda d: w_bytes / d["hbm"] / 0.85),
    ]


MULTI_RANKS = (8, 16, 64)  # the adapters' ranks, cycling (issue 14's mixed ranks)
SHRINK_BLOCKS = 264  # src/ops/multi.rs: the shrink spreads a tile's adapters over up to this many blocks


def multi_ops(sms, n=4096, k=4096):
    """lora_forward_multi (kernels/fused_gemm_multi.cu, kernels/multi_decode.cu) at M = 16, 64, 256, 4096
    tokens with 4, 16, 64 adapters of ranks 8/16/64 (cycling), rows grouped by adapter (adapter i owns
    rows [i*M/A, (i+1)*M/A)): the shrink (per 128-row tile and 1024-column K chunk, Y blocks sharing the
    tile's adapters, 32 k-tiles per adapter; 128x64 tiles where r_max <= 64; at M <= 128 multi_decode_shrink:
    per 32 of T's columns, 16-row group, adapter of the group and K chunk, the chunk's k-tiles, 2 HMMA each
    per warp), lowrank_finalize, and the fused
    GEMM (per 128x128 tile, or 128x64 where mma_bn takes them, ceil(r_a/32) k-tiles per adapter of its rows,
    then K/32; at M <= 16 multi_decode: per 32 columns the same k-tiles, 2 HMMA each per warp). Shown against the bare GEMM at cuBLAS's peak and against
    streaming W0 at HBM bandwidth: issue 14 sets no target."""
    out = []
    for m in (16, 64, 256, 4096):
        for adapters in (4, 16, 64):
            ranks = [MULTI_RANKS[i % len(MULTI_RANKS)] for i in range(adapters)]
            seg = [(i * m // adapters, (i + 1) * m // adapters) for i in range(adapters)]
            tiles_m = cdiv(m, 128)
            passes = [[i for i, (a, b) in enumerate(seg) if b > a and a < (t + 1) * 128 and b > t * 128]
                      for t in range(tiles_m)]
            r_max = max(ranks)
            splits = max(cdiv(k, PROJECTION_PER_SPLIT), 1)
            per_tiles = cdiv(min(PROJECTION_PER_SPLIT, k), 32)
            ys = max(min(adapters, m, 128, cdiv(SHRINK_BLOCKS, tiles_m * splits)), 1)
            shrink_low = sum(len(p) for p in passes) * per_tiles / (tiles_m * ys)  # k-tiles per block, mean
            a_bytes = sum(2 * ranks[i] * k for p in passes for i in p)
            partial = 4 * splits * m * r_max
            # uniform=False: the blocks' work differs with their tiles' adapters (the model's is the mean)
            # src/ops/multi.rs: the shrink's one column tile holds T's r_max columns, 64 of them on the narrow
            # kernel where r_max <= 64
            sbn = mma_bn(m, r_max, splits * ys, sms) if r_max <= FUSED_NARROW_BN else FUSED_BN
            shrink = dict(kernel=fused_kernel("fused_gemm_multi_bf16", sbn), file="fused_gemm_multi", blocks=tiles_m * splits * ys, uniform=False,
                          iters=shrink_low, loop_iters=fused_loop_trips(shrink_low, 0), slots=sbn // 4, slot="HMMA",
                          bytes=2 * m * k + a_bytes + partial)
            if m <= 128:  # one row tile: multi_decode_shrink, a block per 32 of T's columns, 16-row group,
                # adapter of the group and K chunk, each the chunk's k-tiles (2 HMMA per warp each), whatever
                # its adapter's rank (the blocks past a group's adapters exit at once: not counted)
                group_passes = sum(len([i for i, (a, b) in enumerate(seg) if b > a and a < g + 16 and b > g])
                                   for g in range(0, m, 16))
                shrink = dict(kernel="multi_decode_shrink_bf16", file="multi_decode",
                              blocks=cdiv(r_max, 32) * group_passes * splits, iters=per_tiles, slots=2, slot="HMMA",
                              bytes=2 * m * k + a_bytes + partial)
            low = sum(cdiv(ranks[i], 32) for p in passes for i in p) / tiles_m
            b_bytes = sum(2 * n * ranks[i] for p in passes for i in p)
            if m <= 16:  # LK_SMALL_M_MAX: multi_decode, no fused_loop peeling (one loop over all stages)
                fused = dict(kernel="multi_decode_bf16", file="multi_decode", blocks=cdiv(n, 32), uniform=False,
                             iters=low + cdiv(k, 32), slots=2, slot="HMMA",
                             bytes=2 * (m * k + n * k + m * r_max + m * n) + b_bytes)
            else:
                bn = mma_bn(m, n, 1, sms)
                fused = dict(kernel=fused_kernel("fused_gemm_multi_bf16", bn), file="fused_gemm_multi", uniform=False,
                             blocks=tiles_m * cdiv(n, bn), iters=low + cdiv(k, 32),
                             loop_iters=fused_loop_trips(low, cdiv(k, 32)), slots=bn // 4, slot="HMMA",
                             bytes=2 * (m * k + n * k + m * r_max + m * n) + b_bytes)
            launches = [shrink, launch_finalize("lowrank_finalize_bf16", m * r_max, splits, partial), fused]
            gemm = 2 * m * n * k
            out.append((m, adapters, launches, lambda d, g=gemm: g / d["cublas"],
                        lambda d: 2 * n * k / d["hbm"]))
    return out


def bound_launch(l, mix, occ, dev):
    sms = min(l["blocks"], dev["sms"])
    if "hmma" in l:  # exact counts from the launch model (lowrank_grad): one hot-loop trip per step
        issue = mix["total"] * l["iters"] * l["issue_warps"] / (sms * 4 * dev["clock"])
        tensor = l["hmma"] * HMMA_FLOPS / dev["tensor"]
        memory = l["bytes"] / dev["hbm"]
        parts = dict(tensor=tensor, issue=issue, memory=memory)
        limiter = max(parts, key=parts.get)
        return parts[limiter], limiter, parts
    if l["slot"]:
        per_iter = mix[l["slot"]]
        unroll = per_iter / l["slots"] if per_iter else 1.0
        trips = l["iters"] / unroll if unroll else l["iters"]
        # issue: only the iterations the hot loop itself runs (fused_gemm peels a few per phase)
        loop_trips = l.get("loop_iters", l["iters"]) / (unroll or 1.0)
    else:  # a loop with no FFMA/HMMA (the finalize sum): one source iteration per trip
        trips = loop_trips = l["iters"] * l.get("per_thread", 1)
    # the busiest SM, on its own schedulers and its share of the tensor peak: where every block runs the
    # same trips, it runs ceil(blocks / SMs) blocks (the last wave partly idle); where the blocks' work
    # differs (the model's is their mean), an even share, but at least one block (some block does at
    # least the mean, on one SM)
    share = cdiv(l["blocks"], sms) if l.get("uniform", True) else max(1.0, l["blocks"] / sms)
    busiest = share * threads_of(l["file"]) // 32
    issue = mix["total"] * loop_trips * busiest / (4 * dev["clock"])
    tensor = mix["HMMA"] * trips * busiest * HMMA_FLOPS / (dev["tensor"] / dev["sms"])
    memory = l["bytes"] / dev["hbm"]
    parts = dict(tensor=tensor, issue=issue, memory=memory)
    limiter = max(parts, key=parts.get)
    return parts[limiter], limiter, parts


def launches_bound(launches, res, mixes, dev, arch):
    """The bound of launches that run one after another on `arch`: the sum of theirs."""
    total = 0.0
    for l in launches:
        _, r_l = res[(l["kernel"], arch)]
        total += bound_launch(l, mixes[(l["kernel"], arch)], occupancy(r_l, l["kernel"], l["file"], dev), dev)[0]
    return total


def sm90_gemm(kernel, m, n, k, r, dev, mix, bn):
    """fused_gemm_sm90 (kernels/sm90/fused_gemm_sm90.cu) on an m x n x k GEMM with rank r: BM x bn tiles,
    ceil(r/64) + ceil(k/64) stages of BM x bn x 64 each, whose wgmmas multiply ceil(r/16) + 4 ceil(k/64) k16
    steps (the last low-rank stage only those that hold rank columns: the rank is padded to 16). Both
    compute terms are the busiest SM's, which runs ceil(tiles / SMs) tiles (the persistent grid's last wave
    is partly idle). Tensor: its wgmma work at one SM's share of the dense peak. Issue: the consumer loop's
    fewest instructions per stage (hot_loop: its 4 HGMMA, the full-barrier wait, the release) x main
    stages x its tiles x 8 consumer warps, over 4 schedulers x clock (the low-rank stages', the producer's
    and the epilogue's instructions not counted). Memory:
    each operand read once, C written once. Also the bytes TMA brings from L2 into shared memory (every
    stage's (BM + bn) x 64 elements; nothing shared between CTAs: no clusters)."""
    tiles = cdiv(m, SM90_BM) * cdiv(n, bn)
    stages = cdiv(r, SM90_BK) + cdiv(k, SM90_BK)
    # one CTA per SM walks tiles, tiles + sms, ...: some SM gets ceil(tiles / sms) of them (the last wave
    # partly idle), and no SM's tensor cores or schedulers run faster than its share of the peak
    sms = min(tiles, dev["sms"])
    waves = cdiv(tiles, sms)
    tensor = waves * sm90_gemm_flops(SM90_BM, bn, k, r) / (dev["tensor"] / dev["sms"])
    # the main stages only (the low-rank ones may issue fewer wgmmas than the loop read: a lower bound)
    issue = mix["total"] * cdiv(k, SM90_BK) * waves * SM90_CONSUMER_WARPS / (4 * dev["clock"])
    memory = 2 * (m * k + n * k + m * r + n * r + m * n) / dev["hbm"]
    l2 = tiles * stages * 2 * (SM90_BM + bn) * SM90_BK
    parts = dict(tensor=tensor, issue=issue, memory=memory)
    if dev.get("l2"):  # measured: moving those bytes from L2 is a fourth lower limit
        parts["l2"] = l2 / dev["l2"]
    limiter = max(parts, key=parts.get)
    return parts[limiter], limiter, parts, l2


def sm90_t_runs(m, n, sms, bn):
    """fused_gemm_t_sm90's schedule (kernels/sm90/fused_gemm_t_sm90.cu): each CTA a run of ceil(tiles / SMs)
    consecutive 128 x bn tiles in row-major order, T computed on the run's first tile and on each tile of
    column 0. Returns (tiles, runs as (tiles in the run, T computations in it))."""
    tiles_n = cdiv(n, bn)
    tiles = cdiv(m, SM90_BM) * tiles_n
    per = cdiv(tiles, max(1, min(tiles, sms)))
    runs = []
    for first in range(0, tiles, per):
        end = min(first + per, tiles)
        runs.append((end - first, sum(1 for t in range(first, end) if t == first or t % tiles_n == 0)))
    return tiles, runs


def sm90_t_flops(tiles_and_computations, k, r, bn):
    """The tensor work of tiles of fused_gemm_t_sm90 with `computations` of T among them: per tile the main
    stages (k padded to 64) and the (s·T)·Bᵀ stage (r padded to TN, 16 or 32), per computation of T an
    m128nTN product over the main stages."""
    count, computations = tiles_and_computations
    tn = cdiv(r, 16) * 16
    kp = cdiv(k, SM90_BK) * SM90_BK
    return 2 * SM90_BM * (count * bn * (kp + tn) + computations * tn * kp)


def sm90_gemm_t(m, n, k, r, dev, mix, bn, grads=False):
    """fused_gemm_t_sm90 (the forward in one launch, r <= 32, 128 x bn tiles; dX with U inside is the same
    kernel with dY, W0 [k, n], B [k, r] and A [r, n], the same stages and bytes), bounded as sm90_gemm: tensor
    time of the busiest CTA's wgmma work (its run's tiles and its computations of T) at one SM's share of
    the peak; issue time of its main stages with `mix`, the plain kernel's consumer loop (the tiles that do
    not compute T run that same loop; those that do run more instructions: a lower bound); memory time (X,
    W0, A, B read once, Y and T written once; dX's U is not written). L2 to SM: every main stage's X and W0 boxes, A's TN x 64
    slice on the stages that compute T, and B's bn x 64 box per tile. With `grads` (dX): dB's partials on
    each row block's tile of column 0, an m64nTNk128 product per stage (TN: the rank padded to 16 or 32),
    T's 128 x TN tile read once per row block and the f32 partials written; and dA's on every tile, an
    m64nTNk128 product per 64 columns of the layer input X [m, n], whose tiles are read once (from HBM and
    through L2), and their f32 partials written. Returns (bound, limiter, parts, L2 bytes, total tensor
    work)."""
    tiles, runs = sm90_t_runs(m, n, dev["sms"], bn)
    tn = cdiv(r, 16) * 16
    stages = cdiv(k, SM90_BK)
    tiles_n = cdiv(n, bn)
    per = cdiv(tiles, max(1, min(tiles, dev["sms"])))
    col0 = [sum(1 for t in range(f, min(f + per, tiles)) if t % tiles_n == 0) for f in range(0, tiles, per)]
    db_flops = 2 * SM90_BM * tn * stages * SM90_BK if grads else 0  # per row block
    da_flops = 2 * SM90_BM * tn * bn if grads else 0  # per tile
    busiest = max(sm90_t_flops(run, k, r, bn) + c * db_flops + run[0] * da_flops for run, c in zip(runs, col0))
    tensor = busiest / (dev["tensor"] / dev["sms"])
    issue = mix["total"] * stages * max(c for c, _ in runs) * SM90_CONSUMER_WARPS / (4 * dev["clock"])
    rows = cdiv(m, SM90_BM)
    # T written by the forward; dX's U stays in the kernel, which reads T and X instead
    memory = (2 * (m * k + n * k + r * k + n * r + m * n)
              + ((2 * m * r + 4 * rows * k * r + 2 * m * n + 4 * rows * r * n) if grads else 2 * m * r)) / dev["hbm"]
    computations = sum(c for _, c in runs)
    l2 = 2 * SM90_BK * (tiles * stages * (SM90_BM + bn) + computations * stages * tn + tiles * bn)
    l2 += (2 * SM90_BM * tn * rows + 2 * SM90_BM * bn * tiles) if grads else 0
    parts = dict(tensor=tensor, issue=issue, memory=memory)
    if dev.get("l2"):
        parts["l2"] = l2 / dev["l2"]
    limiter = max(parts, key=parts.get)
    work = sum(sm90_t_flops(run, k, r, bn) for run in runs) + rows * db_flops + tiles * da_flops
    return parts[limiter], limiter, parts, l2, work


def sm90_gemm_flops(m, n, k, r):
    """The tensor work fused_gemm_sm90 executes: the main stages BK deep (k padded to 64), the low-rank ones
    as many k16 steps as hold rank columns (r padded to 16)."""
    return 2 * m * n * (cdiv(r, 16) * 16 + cdiv(k, SM90_BK) * SM90_BK)


def sm90_needed_verdict(needed, dev, outside):
    """What the needed rates say, in words: which targets a GEMM at cuBLAS's rate would miss, and by how
    much of that rate; `outside` names, per target, what still runs outside its kernel."""
    over = [(name, rate) for name, _, _, rate in needed if rate > dev["cublas"]]
    if not over:
        return "A GEMM at cuBLAS's own rate would meet both with the other launches at their bounds."
    return ("A GEMM at cuBLAS's own rate would miss the " + " and the ".join(
        f"{name} by {100 * (rate / dev['cublas'] - 1):.0f}% of that rate ({outside[name]} still run alone, "
        "memory-bound, while HBM is little used during the tensor-bound GEMM)" for name, rate in over) +
        ": reaching it takes a GEMM faster than cuBLAS's by that much, or that work made smaller or "
        "overlapped with the GEMM.")


def sm90_section(w, res, mixes, dev):
    """The forward and backward with the sm_90a kernels in place of the mma.sync ones: the forward in one
    launch with T inside the GEMM (fused_gemm_t_sm90, r <= 32), the forward with the projection launch first
    (fused_gemm_sm90, LK_FUSED_GEMM=sm90-projection; ranks above 32), the backward with U inside the dX
    kernel (fused_gemm_u<TN>_sm90_nn, r <= 32) and with U from the pass over dY (fused_gemm_sm90's "nn");
    the other launches are the mma.sync ones, bounded as in the tables above."""
    M, N, K, R = 8192, 4096, 4096, 16
    tn = cdiv(R, 16) * 16
    t_kern = f"fused_gemm_t{tn}_sm90_bf16"
    w("The forward and backward on the sm_90a path. The forward at this rank is one launch, "
      f"kernels/sm90/fused_gemm_t_sm90.cu ({t_kern}: T = X·Aᵀ computed inside the GEMM, ranks up to "
      f"{SM90_T_MAX_RANK}); above that, and under LK_FUSED_GEMM=sm90-projection, the projection's launches "
      "run first and kernels/sm90/fused_gemm_sm90.cu adds s·T·Bᵀ. The backward's dX at this rank is one launch "
      f"too (fused_gemm_u{tn}_sm90_nn_bf16: U = dY·B computed inside, and dB's and dA's partial sums, so no "
      "pass over dY or X runs, only their two finalizes besides); above that, and under sm90-projection, the pass over dY computes dB and U "
      "and fused_gemm_sm90's \"nn\" kernel takes dX (the backward's other launches are the mma.sync ones "
      "above). The sm_90a kernels are "
      "bounded like the others, from their SASS (the consumer loop: tensor time of the wgmma work at the dense "
      "bf16 peak, the rank padded to 16; issue time of the 8 consumer warps over the main stages; both for "
      "the SM with the most work; memory time). L2 to SM: the bytes their TMA loads bring into shared "
      "memory, and the rate that needs at the target time. " + (
          f"The rate L2 feeds the SMs, {dev['l2'] / 1e12:.1f} TB/s (the perf table's `L2 read`), bounds it "
          "as a fourth term (l2):" if dev.get("l2") else
          "The perf table measures the rate L2 feeds the SMs (its `L2 read`, kernels/l2_probe.cu) on a GPU; "
          "none has been measured on this device yet, so this is shown, not counted (entered as `l2` in "
          "scripts/perf_bound.py, it becomes a fourth term of the bound):"))
    w("")
    w("| target | other launches (µs) | sm_90a kernel: bound (µs) | limited by | tensor | issue | memory | "
      "L2 to SM (GB) | at the target (TB/s) | op bound (µs) | target (µs) | bound / target | verdict | "
      "GEMM rate needed (TF/s) | needed / cuBLAS |")
    w("| --- " * 15 + "|")

    def row(target, rest, b, limiter, parts, l2, t, work):
        total = rest + b
        # the rate the kernel must reach on the wgmma work it executes (the rank padded to 16) in the
        # time the target leaves it after the other launches at their bounds
        rate = work / (t - rest)
        w(f"| {target} | {rest * 1e6:.1f} | {b * 1e6:.1f} | {limiter} | {parts['tensor'] * 1e6:.1f} | "
          f"{parts['issue'] * 1e6:.1f} | {parts['memory'] * 1e6:.1f} | {l2 / 1e9:.2f} | {l2 / t / 1e12:.1f} | "
          f"{total * 1e6:.1f} | {t * 1e6:.1f} | {total / t:.2f} | {'MISS' if total > t else 'open'} | "
          f"{rate / 1e12:.0f} | {rate / dev['cublas']:.2f} |")
        return total, rate

    (fwd_target, _, _, fwd_tgt), (bwd_target, _, _, _) = headline_ops(dev["sms"])[:2]
    wide = sm90_kernel(False, SM90_BN)
    assert sm90_bn(M, N, dev["sms"]) == SM90_BN
    bt, limiter, parts, l2, t_work = sm90_gemm_t(M, N, K, R, dev, mixes[(wide, "sm_90")], SM90_BN)
    t_fwd = fwd_tgt(dev)
    fwd_t, rate_t = row(f"{fwd_target}, T inside ({t_kern})", 0.0, bt, limiter, parts, l2, t_fwd, t_work)
    gemms = (("fused_gemm_nt_bf16", False, M, N, K, "T by the projection"),
             ("fused_gemm_nn_bf16", True, M, K, N, "U by the pass over dY, dX"))
    projection, needed, fwd_p = None, [("forward", 0.0, t_fwd, rate_t)], None
    for (target, _, launches, tgt), (replaced, nn, gm, gn, gk, label) in zip(headline_ops(dev["sms"])[:2], gemms):
        bn = sm90_bn(gm, gn, dev["sms"])
        kern = sm90_kernel(nn, bn)
        assert launches[-1]["kernel"] == replaced, (launches[-1]["kernel"], replaced)
        t = tgt(dev)
        if nn:
            # dX with U inside: at r <= 16 dB's and dA's partials too, then their finalizes; at 17..32 the
            # pass over dY computes dB alone, then the dA pass; the projection-like structure (the row
            # after) is what runs above rank 32
            u_kern = f"fused_gemm_u{tn}_sm90_nn{'_narrow' if bn == SM90_NARROW_BN else ''}_bf16"
            grads = R <= 16
            rb = cdiv(M, SM90_BM)
            if grads:
                other = [launch_finalize("lowrank_finalize_bf16", N * R, rb, 4 * rb * N * R),
                         launch_finalize("lowrank_finalize_bf16", K * R, rb, 4 * rb * K * R)]
            else:
                other = (launch_lowrank_grad("bf16", "lowrank_finalize_bf16", M, N, R, False)
                         + launch_lowrank_grad("bf16", "lowrank_finalize_bf16", M, K, R, False))
            rest_u = launches_bound(other, res, mixes, dev, "sm_90")
            bu, limiter, parts, l2, u_work = sm90_gemm_t(gm, gn, gk, R, dev, mixes[(kern, "sm_90")], bn, grads)
            inside = "U and dB's and dA's partials" if grads else "U"
            outside = {"forward": "nothing",
                       "backward": "the finalizes of dB's and dA's per-row-block partial sums" if grads else
                       "the passes over dY for dB and over X for dA, with their finalizes"}
            bwd_u, rate_u = row(f"{target}, {inside} inside dX ({u_kern})", rest_u, bu, limiter, parts, l2, t,
                                u_work)
            needed.append((target.split(" ")[0], rest_u, t - rest_u, rate_u))
        rest = launches_bound(launches[:-1], res, mixes, dev, "sm_90")
        b, limiter, parts, l2 = sm90_gemm(kern, gm, gn, gk, R, dev, mixes[(kern, "sm_90")], bn)
        total, rate = row(f"{target}, {label} ({kern})", rest, b, limiter, parts, l2, t,
                          sm90_gemm_flops(gm, gn, gk, R))
        if projection is None:
            projection, fwd_p, rate_p = rest, total, rate  # the forward's: T = X·Aᵀ and its finalize
        else:
            bwd_rest, bwd_p, rate_bp = rest, total, rate  # the backward's: dB + U, dA and their finalizes
    w("")
    w("What the bound cannot say, the last two columns do: with the other launches at their bounds, the time "
      "the target leaves the sm_90a kernel at most, and the rate its wgmma work (the rank padded to 16) "
      f"must at least run at to fit, against cuBLAS's measured {dev['cublas'] / 1e12:.0f} TF/s at 8192^3 (the "
      "targets take cuBLAS at that rate on their shape too; a cuBLAS slower there lengthens the target time "
      "and so shrinks the other launches' share): " + "; ".join(
          f"the {name}: {left * 1e6:.1f} µs after {rest * 1e6:.1f} µs of other launches, "
          f"{rate / 1e12:.0f} TF/s, {rate / dev['cublas']:.2f}x cuBLAS's rate and "
          f"{100 * rate / dev['tensor']:.0f}% of the dense peak" for name, rest, left, rate in needed) +
      f" (the forward with the projection launch first would need {rate_p / 1e12:.0f} TF/s, "
      f"{rate_p / dev['cublas']:.2f}x; the backward with U from the pass over dY {rate_bp / 1e12:.0f} TF/s, "
      f"{rate_bp / dev['cublas']:.2f}x). " + sm90_needed_verdict(needed, dev, outside))
    w("")
    nb = SM90_NARROW_BN
    narrow = sm90_kernel(False, nb)
    l2_128 = sm90_gemm(narrow, M, N, K, R, dev, mixes[(narrow, "sm_90")], nb)[3]
    w(f"The tile is {SM90_BM}x{SM90_BN} (m64n{SM90_BN} per consumer warpgroup). L2 to SM with {SM90_BM}x{nb} "
      f"tiles (m64n{nb}, the narrow kernels) and the projection: {l2_128 / 1e9:.2f} GB, "
      f"{l2_128 / t_fwd / 1e12:.1f} TB/s at the forward's target time; with two-CTA clusters multicasting the "
      f"shared operand, less than the table's.")
    w("")
    # T inside the forward kernel: the three ways it could be done
    tiles, runs = sm90_t_runs(M, N, dev["sms"], SM90_BN)
    computations = sum(c for _, c in runs)
    base = 2 * M * N * (cdiv(K, SM90_BK) * SM90_BK + tn)
    every_tile = 2 * SM90_BM * tn * cdiv(K, SM90_BK) * SM90_BK * tiles
    w(f"Why T inside the forward kernel, and how: the projection and its finalize bound at "
      f"{projection * 1e6:.1f} µs before the GEMM (op bound {fwd_p * 1e6:.1f} µs); with T inside the one "
      f"launch, {fwd_t * 1e6:.1f} µs. Computing T again in each of the {cdiv(N, SM90_BN)} column tiles of a "
      f"row block (the grouped tile order fused_gemm_sm90.cu uses) would add {100 * every_tile / base:.1f}% "
      f"tensor work; fused_gemm_t_sm90 gives each CTA a run of ceil(tiles / SMs) consecutive tiles in "
      f"row-major order ({len(runs)} runs of up to {max(c for c, _ in runs)} of the {tiles} tiles here), "
      f"computes T on a run's first tile and where a row block starts, and keeps s·T in registers for the "
      f"rest of the row block: {computations} computations of T for {cdiv(M, SM90_BM)} row blocks, "
      f"{100 * (t_work - base) / base:.1f}% more tensor work than the GEMM with the rank stage alone. "
      f"s·(T·Bᵀ) is added after X·W0ᵀ there (T exists only after the main stages), with s folded into T's "
      f"rounded value (exact for a power-of-two s): the bits differ from the mma.sync path's, within the "
      f"tolerances. Ranks above {SM90_T_MAX_RANK} keep the projection: the A slice of a 64-rank T would not "
      f"fit the three stages' shared memory.")
    w("")
    assert R <= 16, "the paragraph below describes dX's kernel with dB's and dA's partials"
    w(f"U, dB and dA inside dX, the same way: the pass over dY that computed dB and U (U's per-strip f32 partials "
      f"and their finalize included) and the dA pass bound at {bwd_rest * 1e6:.1f} µs (op bound "
      f"{bwd_p * 1e6:.1f} µs). The dX kernel computes U from the dY tiles it streams (B's {tn}x64 slice per "
      f"stage, read MN-major) and, at ranks up to 16, dB's partial dYᵀ·T for each row block on its tile of "
      f"column 0 (an m64n16k128 product per stage, the stages alternating between the two consumers, T's "
      f"128x16 tile in shared memory after the output tile) and dA's partial Uᵀ·X on every tile (after its "
      f"last stage, {SM90_BN // 128} more stages bring two of X's 128x64 boxes each, one per consumer, and an "
      f"m64n16k128 product with U's tile, which both consumers write into shared memory once per row block); "
      f"{cdiv(M, SM90_BM)} partials of N x r and of r x K f32, each added in order by a finalize, which are "
      f"the other launches: {rest_u * 1e6:.1f} µs, and {bwd_u * 1e6:.1f} µs in all. " + sm90_rank32_backward(
          res, mixes, dev, M, N, K))
    w("")
    sm90_by_m(w, res, mixes, dev, N, K, R)


def sm90_rank32_backward(res, mixes, dev, M, N, K):
    """The backward at rank 32 (ranks 17..32): dX with dB's and dA's partials inside on the narrow tiles (the
    U32 kernels' only width: T's and U's 128 x 32 tiles do not fit beside the wide ring) and their
    finalizes, against the wide tiles with U alone inside and the passes over dY for dB and over X for dA (the
    structure before; L2 to SM for both, which the narrow tiles need more of)."""
    r, rb, nb = 32, cdiv(M, SM90_BM), SM90_NARROW_BN
    narrow, wide = sm90_kernel(True, nb), sm90_kernel(True, SM90_BN)
    fin = launches_bound([launch_finalize("lowrank_finalize_bf16", N * r, rb, 4 * rb * N * r),
                          launch_finalize("lowrank_finalize_bf16", K * r, rb, 4 * rb * K * r)],
                         res, mixes, dev, "sm_90")
    passes = launches_bound(launch_lowrank_grad("bf16", "lowrank_finalize_bf16", M, N, r, False)
                            + launch_lowrank_grad("bf16", "lowrank_finalize_bf16", M, K, r, False),
                            res, mixes, dev, "sm_90")
    kn, _, _, l2n, _ = sm90_gemm_t(M, K, N, r, dev, mixes[(narrow, "sm_90")], nb, True)
    kw, _, _, l2w, _ = sm90_gemm_t(M, K, N, r, dev, mixes[(wide, "sm_90")], SM90_BN, False)
    return (f"Ranks 17..32 run the same on the {SM90_BM}x{nb} tiles alone (the U32 kernels, 4 stages: T's and U's "
            f"128x32 tiles do not fit beside the wide ring): at r = 32, {kn * 1e6:.1f} µs + {fin * 1e6:.1f} µs of "
            f"finalizes = {(kn + fin) * 1e6:.1f} µs, against {kw * 1e6:.1f} + {passes * 1e6:.1f} µs = "
            f"{(kw + passes) * 1e6:.1f} µs for the wide tiles with U alone inside and the passes over dY and X; "
            f"L2 to SM {l2n / 1e9:.2f} against {l2w / 1e9:.2f} GB, which a measured `L2 read` will weigh.")


def sm90_by_m(w, res, mixes, dev, n, k, r):
    """The forward's fused GEMM alone, by M: the mma.sync kernel, the sm_90a one with each tile width, and
    the width ops::sm90_tile picks (the busiest SM's work decides it); then the whole sm_90a forward, the
    projection's launches + that GEMM against the one launch with T inside (fused_gemm_t_sm90), at r and
    2r."""
    nb = SM90_NARROW_BN
    w(f"The forward's fused GEMM alone by M (N = K = {n}, r = {r}, bf16; bounds in µs, blocks or tiles in "
      f"brackets): the mma.sync kernel ({FUSED_BM}x{FUSED_BN} tiles, or {FUSED_BM}x{FUSED_NARROW_BN} where "
      f"`ops::mma_tile` takes them, marked n; 2 blocks per SM), the sm_90a kernel with "
      f"{SM90_BM}x{SM90_BN} and with {SM90_BM}x{nb} tiles (the narrow kernels), and the width the launch "
      f"takes (`ops::sm90_tile`: the narrow tiles where the busiest SM has less work with them). Up to "
      f"M = {(cdiv(dev['sms'], cdiv(n, nb)) - 1) * SM90_BM} there are fewer tiles of either width than the "
      f"{dev['sms']} SMs:")
    w("")
    w(f"| M | mma.sync | sm_90a {SM90_BM}x{SM90_BN} | sm_90a {SM90_BM}x{nb} | taken |")
    w("| --- | --- | --- | --- | --- |")
    ms = (64, 256, 512, 1024, 1536, 2048, 4096, 8192)
    for m in ms:
        l = launch_fused("fused_gemm_nt_bf16", m, n, k, r, dev["sms"])
        _, res_mma = res[(l["kernel"], "sm_90")]
        b_mma = bound_launch(l, mixes[(l["kernel"], "sm_90")],
                             occupancy(res_mma, l["kernel"], l["file"], dev), dev)[0]
        cells = []
        for bn in (SM90_BN, nb):
            kern = sm90_kernel(False, bn)
            b = sm90_gemm(kern, m, n, k, r, dev, mixes[(kern, "sm_90")], bn)[0]
            cells.append(f"{b * 1e6:.1f} ({cdiv(m, SM90_BM) * cdiv(n, bn)})")
        mark = "n" if "_narrow" in l["kernel"] else ""
        w(f"| {m} | {b_mma * 1e6:.1f} ({l['blocks']}{mark}) | {cells[0]} | {cells[1]} | "
          f"{SM90_BM}x{sm90_bn(m, n, dev['sms'])} |")
    w("")
    w(f"The whole sm_90a forward by M (µs): the projection's launches (T = X·Aᵀ, mma.sync, and its finalize) "
      f"+ the fused GEMM, against the one launch with T inside (fused_gemm_t_sm90, which the launch takes "
      f"at every M for r <= {SM90_T_MAX_RANK}, so at both ranks here), both at the width taken (the narrow "
      f"one-launch kernels have 5 stages, not 6), with how many tiles each CTA runs and how often T is "
      f"computed per row block. Where a run is shorter than a row block T is computed on more tiles, up to "
      f"every one:")
    w("")
    assert 2 * r <= SM90_T_MAX_RANK, "the table's ranks are those the one launch takes"
    w("| M | r | tiles | projection + GEMM | one launch, T inside | tiles per CTA | T per row block |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for rr in (r, 2 * r):
        for m in ms:
            proj = launches_bound(launch_grad("fused_gemm_nt_bf16", "lowrank_finalize_bf16", k, m, rr, dev["sms"]), res,
                                  mixes, dev, "sm_90")
            bn = sm90_bn(m, n, dev["sms"])
            kern = sm90_kernel(False, bn)
            two = proj + sm90_gemm(kern, m, n, k, rr, dev, mixes[(kern, "sm_90")], bn)[0]
            one = sm90_gemm_t(m, n, k, rr, dev, mixes[(kern, "sm_90")], bn)[0]
            _, runs = sm90_t_runs(m, n, dev["sms"], bn)
            per_block = sum(c for _, c in runs) / cdiv(m, SM90_BM)
            w(f"| {m} | {rr} | {SM90_BM}x{bn} | {two * 1e6:.1f} | {one * 1e6:.1f} | {max(c for c, _ in runs)} | "
              f"{per_block:.1f} |")
    w("")


def dora_layer_section(w, res, mixes, dev, arch):
    """DoRA's unmerged layer at the headline shape against the plain LoRA forward and backward."""
    M, N, K, R = 8192, 4096, 4096, 16
    plain = {op: launches for _, op, launches, _ in headline_ops(dev["sms"])}
    extra_fwd, extra_bwd = dora_layer_extra(M, N, K, R)
    drop_fwd, drop_bwd = dora_dropout_extra(M, N, K, R, dev["sms"])
    w("DoRA's unmerged layer (ops::dora_forward, dora_backward; M = 8192, N = K = 4096, r = 16, bf16; no target: "
      "against the plain LoRA op's bound above, whose launches it runs too; µs):")
    w("")
    w("| op | bound | plain LoRA | DoRA / plain | added launches (bound, limited by) |")
    w("| --- | --- | --- | --- | --- |")
    for op, base, extra in (("dora_forward", plain["lora_forward"], extra_fwd),
                            ("dora_backward", plain["lora_backward"], extra_bwd),
                            ("dora_forward, LoRA dropout", plain["lora_forward"], drop_fwd),
                            ("dora_backward, LoRA dropout", plain["lora_backward"], drop_bwd)):
        pb = launches_bound(base, res, mixes, dev, arch)
        added, parts_txt = 0.0, []
        for l in extra:
            _, res_l = res[(l["kernel"], arch)]
            b, limiter, _ = bound_launch(l, mixes[(l["kernel"], arch)],
                                         occupancy(res_l, l["kernel"], l["file"], dev), dev)
            added += b
            parts_txt.append(f"{l['kernel']} {b * 1e6:.1f} {limiter}")
        w(f"| {op} | {(pb + added) * 1e6:.1f} | {pb * 1e6:.1f} | {(pb + added) / pb:.2f} | {'; '.join(parts_txt)} |")
    w("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda-dir", required=True)
    ap.add_argument("--cuobjdump", required=True)
    ap.add_argument("--kernels-dir", required=True, help="kernels/ (only its .cu files count)")
    args = ap.parse_args()
    cuda = args.cuda_dir
    sources = {f[:-3] for f in os.listdir(args.kernels_dir) if f.endswith(".cu")}
    read_params_h(os.path.join(args.kernels_dir, "include", "lora_params.h"))
    hopper_dir = os.path.join(args.kernels_dir, "sm90")
    hopper = {f[:-3] for f in os.listdir(hopper_dir) if f.endswith(".cu")} if os.path.isdir(hopper_dir) else set()
    files = sorted(f[:-7] for f in os.listdir(cuda) if f.endswith(".fatbin") and f[:-7] in sources | hopper)
    res, mixes = {}, {}
    for f in files:
        # the Hopper files hold sm_90a code only, listed under sm_90 (the device they run on)
        archs = {a: HOPPER_ARCH[a] for a in DEVICES if a in HOPPER_ARCH} if f in hopper else {a: a for a in DEVICES}
        with open(os.path.join(cuda, "ptxas", f + ".txt")) as fh:
            for (kern, arch), r in ptxas_resources(fh.read()).items():
                for listed, built in archs.items():
                    if arch == built:
                        res[(kern, listed)] = (f, r)
        for listed, built in archs.items():
            for kern, insts in sass_functions(args.cuobjdump, os.path.join(cuda, f + ".fatbin"), built).items():
                mixes[(kern, listed)] = hot_loop(insts)
    missing = sorted(a for a in DEVICES if not any(arch == a for _, arch in res))
    if missing:
        sys.exit(f"the build in {cuda} has no {' or '.join(missing)} code: the bound reads every architecture "
                 f"of its table ({', '.join(sorted(DEVICES))}); build with the default LK_CUDA_ARCHS (or one "
                 "naming them) first")
    out = []
    w = out.append
    w("# Speed bound from the compiled code")
    w("")
    w("Generated by `scripts/perf-bound.sh` from the nvcc 13.0 build of this commit (ptxas reports and SASS "
      "read with cuobjdump); no GPU involved. A bound is a lower limit on time: `MISS` proves a target "
      "missed, `open` proves nothing (only a run on the GPU can say met). Each launch is bounded by the "
      "largest of its tensor time (HMMA executed x 4096 flop / tensor peak), issue time (the instructions "
      "one full iteration of the hot loop executes at least: of the paths through it that do the most math, the "
      "shortest; x trips x warps / (SMs x 4 schedulers x "
      "clock); only the hot loop is counted) and "
      "memory time (bytes it must move once / HBM bandwidth); an op by the sum over its launches. Where "
      "every block does the same work, the tensor and issue times are those of the SM that runs the most "
      "blocks, ceil(blocks / SMs), at its share of the peaks: the last wave's idle SMs count (lowrank_grad: "
      "an even share over the SMs; the many-adapter launches, whose blocks differ: an even share, at least "
      "one block). Not counted (so the bound stays a bound): prologues, epilogues, launch gaps, "
      "bank conflicts, latency.")
    w("")
    for arch, dev in DEVICES.items():
        w(f"## {dev['name']}")
        w("")
        w(f"Source of the peaks: {dev['source']}.")
        w("")
        w("| target | op | bound (µs) | target (µs) | bound / target | verdict |")
        w("| --- | --- | --- | --- | --- | --- |")
        details = []
        for target, op, launches, tgt in headline_ops(dev["sms"]):
            total, lines = 0.0, []
            for l in launches:
                mix = mixes[(l["kernel"], arch)]
                _, r = res[(l["kernel"], arch)]
                occ = occupancy(r, l["kernel"], l["file"], dev)
                b, limiter, parts = bound_launch(l, mix, occ, dev)
                total += b
                lines.append(f"| {l['kernel']} | {l['blocks']} | {b * 1e6:.1f} | {limiter} | "
                             f"{parts['tensor'] * 1e6:.1f} | {parts['issue'] * 1e6:.1f} | "
                             f"{parts['memory'] * 1e6:.1f} |")
            t = tgt(dev)
            verdict = "MISS" if total > t else "open"
            if total > t and not dev["measured"]:
                # the target assumes the baseline at its peak (the strictest case): a miss is proven only
                # if the real baseline reaches more than t / total of its peak
                verdict = f"MISS unless the baseline reaches under {100 * t / total:.0f}% of its peak"
            w(f"| {target} | {op} | {total * 1e6:.1f} | {t * 1e6:.1f} | {total / t:.2f} | {verdict} |")
            details.append((target, lines))
        w("")
        w("Launches (µs; the bound of each is the largest of the three):")
        w("")
        w("| target | launch | blocks | bound | limited by | tensor | issue | memory |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for target, lines in details:
            for line in lines:
                w(f"| {target.split(' ')[0]} " + line)
        w("")
        if arch == "sm_90" and ("fused_gemm_sm90_bf16", arch) in res:
            sm90_section(w, res, mixes, dev)
        w("Merge of 4096^2 bf16 by rank (not a headline target; µs, as above):")
        w("")
        w("| rank | launch | blocks | bound | limited by | tensor | issue | memory |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r, l in merge_ranks():
            _, res_l = res[(l["kernel"], arch)]
            b, limiter, parts = bound_launch(l, mixes[(l["kernel"], arch)], occupancy(res_l, l["kernel"], l["file"], dev), dev)
            w(f"| {r} | {l['kernel']} | {l['blocks']} | {b * 1e6:.1f} | {limiter} | {parts['tensor'] * 1e6:.1f} | "
              f"{parts['issue'] * 1e6:.1f} | {parts['memory'] * 1e6:.1f} |")
        w("")
        w("DoRA merge of 4096^2 bf16 by rank (ops::dora_merge: three launches; no target: against the plain "
          "merge's bound above; µs, as above):")
        w("")
        w("| rank | bound | limited by (per launch) | plain merge | DoRA / plain |")
        w("| --- | --- | --- | --- | --- |")
        for r, plain in merge_ranks():
            total, parts_txt = 0.0, []
            for l in launch_dora_merge(4096, 4096, r):
                _, res_l = res[(l["kernel"], arch)]
                b, limiter, _ = bound_launch(l, mixes[(l["kernel"], arch)],
                                             occupancy(res_l, l["kernel"], l["file"], dev), dev)
                total += b
                parts_txt.append(f"{l['kernel']} {b * 1e6:.1f} {limiter}")
            _, res_p = res[(plain["kernel"], arch)]
            pb, _, _ = bound_launch(plain, mixes[(plain["kernel"], arch)],
                                    occupancy(res_p, plain["kernel"], plain["file"], dev), dev)
            w(f"| {r} | {total * 1e6:.1f} | {'; '.join(parts_txt)} | {pb * 1e6:.1f} | {total / pb:.2f} |")
        w("")
        dora_layer_section(w, res, mixes, dev, arch)
        w("Many adapters in one batch (lora_forward_multi; N = K = 4096, ranks 8/16/64 cycling, rows grouped "
          "by adapter; no target: shown against the bare GEMM at cuBLAS's peak and W0 streamed at HBM "
          "bandwidth; µs):")
        w("")
        w("| M | adapters | bound | bare GEMM at peak | bound / GEMM | W0 stream | bound / stream | launches (bound, limited by) |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for m, adapters, launches, gemm_t, stream_t in multi_ops(dev["sms"]):
            total, parts_txt = 0.0, []
            for l in launches:
                _, res_l = res[(l["kernel"], arch)]
                b, limiter, _ = bound_launch(l, mixes[(l["kernel"], arch)],
                                             occupancy(res_l, l["kernel"], l["file"], dev), dev)
                total += b
                parts_txt.append(f"{l['kernel']} {b * 1e6:.1f} {limiter}")
            g, st = gemm_t(dev), stream_t(dev)
            w(f"| {m} | {adapters} | {total * 1e6:.1f} | {g * 1e6:.1f} | {total / g:.2f} | {st * 1e6:.1f} | "
              f"{total / st:.2f} | {'; '.join(parts_txt)} |")
        w("")
        w("Kernels: resources, occupancy, and the SASS of the hot loop: the instructions one full iteration "
          "executes at least (of the paths that do the most math, the shortest), and the whole body "
          "(the difference is run-time branching inside the loop):")
        w("")
        w("| kernel | regs | smem (static + dynamic) | spills | blocks/SM | warps/SM | "
          + " | ".join(CLASSES) + " | total | body |")
        w("| --- " * (8 + len(CLASSES)) + "|")
        for (kern, a), (f, r) in sorted(res.items()):
            if a != arch:
                continue
            mix = mixes[(kern, arch)]
            occ = occupancy(r, kern, f, dev)
            smem = f"{r['smem']} + {dyn_smem(kern, f)}"
            spills = r["spill_stores"] + r["spill_loads"]
            w(f"| {kern} | {r['regs']} | {smem} | {spills} | {occ} | {occ * threads_of(f) // 32} | "
              + " | ".join(str(mix[c]) for c in CLASSES) + f" | {mix['total']} | {mix['body']} |")
        w("")
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
