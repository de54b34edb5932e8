"""Tests of scripts/perf_bound.py's models of the sm_90a one-launch kernels (kernels/sm90/fused_gemm_t_sm90.cu)
against simulations written from the kernels' and the launch's own loops, not from the bound's formulas:
the schedule (ops/sm90.rs one_launch's grid, the kernel's run_of), the tensor work (every wgmma the two
consumer warpgroups issue, per CTA: the total and the busiest CTA), and the bytes TMA brings into shared
memory (the producer's loads); the tile widths README lists for ops::sm90_tile; and the mma.sync fused
GEMM's width choice (mma_bn against ops::mma_tile's tested values) with the launches it gives. No build or
GPU needed.

Run by scripts/test.sh (the README's test command): python3 -m unittest discover -s scripts -p 'test_*.py'
"""
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import perf_bound as pb  # noqa: E402

pb.read_params_h(os.path.join(HERE, "..", "kernels", "include", "lora_params.h"))
BM, BK = pb.SM90_BM, pb.SM90_BK
H100 = next(d for d in pb.DEVICES.values() if d["sms"] == 132)


def cdiv(a, b):
    return -(-a // b)


def kernel_runs(m, n, sms, bn):
    """The CTAs' runs of tiles: the grid of ops/sm90.rs one_launch (ceil(tiles / SMs) tiles per CTA, as many
    CTAs as that takes) and the kernel's run_of (per = ceil(tiles / gridDim.x), [first, end))."""
    tiles = cdiv(m, BM) * cdiv(n, bn)
    per_cta = max(1, cdiv(tiles, max(1, sms)))
    grid = cdiv(tiles, per_cta)
    per = cdiv(tiles, grid)
    runs = []
    for block in range(grid):
        first = min(block * per, tiles)
        runs.append(list(range(first, min(first + per, tiles))))
    return tiles, runs


def wgmma_flops(n):
    """One wgmma m64nNk16."""
    return 2 * 64 * n * 16


def simulate(m, n, k, r, sms, bn, grads):
    """fused_gemm_t_sm90_impl's loops: per CTA the flops of the wgmmas both consumers issue, and the bytes
    of every TMA load the producer issues. Returns (flops per CTA, bytes)."""
    tn = cdiv(r, 16) * 16
    tiles_n = cdiv(n, bn)
    main = cdiv(k, BK)
    _, runs = kernel_runs(m, n, sms, bn)
    per_cta, loaded = [], 0
    for run in runs:
        flops = 0
        for tile in run:
            n0 = tile % tiles_n * bn
            with_t = tile == run[0] or n0 == 0
            with_db = grads and n0 == 0
            if with_db:
                loaded += BM * tn * 2  # T's row-block tile
            for j in range(main):
                loaded += 2 * (BM * BK + bn * BK + (tn * BK if with_t else 0))  # X (dY), W0, A's (B's) slice
                for half in range(2):
                    flops += 4 * wgmma_flops(bn)  # consume_stage: four k16 steps of m64nBN
                    if with_t:
                        flops += 4 * wgmma_flops(tn)  # T (U) on the same X (dY) slice
                    if with_db and j % 2 == half:
                        flops += (BM // 16) * wgmma_flops(tn)  # issue_box_t_tile: P = dYᵀ·T, k over 128 rows
            loaded += 2 * bn * BK  # the last stage: B's bn x 64 box (A's bn/64 64 x 64 boxes)
            flops += 2 * (tn // 16) * wgmma_flops(bn)  # consume_stage_rs, both consumers
            if grads:
                for x in range(bn // 128):  # dA's stages: two of X's 128 x 64 boxes, one per consumer
                    loaded += 2 * 2 * BM * BK
                    flops += 2 * (BM // 16) * wgmma_flops(tn)
        per_cta.append(flops)
    return per_cta, loaded


SHAPES = [
    # (m, n, k, r, sms): the headline shape, runs shorter and longer than a row block, ragged edges, one SM
    (8192, 4096, 4096, 16, 132),
    (1536, 4096, 4096, 32, 132),
    (300, 768, 768, 16, 5),
    (300, 768, 768, 8, 3),
    (129, 257, 65, 24, 7),
    (1, 64, 8, 8, 1),
    (4096, 1024, 3000, 16, 16),
]


def model_and_simulation():
    """Every shape at both tile widths, with dB's and dA's partials where the rank allows: (the case, the
    simulation, sm90_gemm_t's result, the device)."""
    for m, n, k, r, sms in SHAPES:
        dev = dict(H100, sms=sms)
        for bn in (pb.SM90_BN, pb.SM90_NARROW_BN):
            for grads in (False, True):
                yield ((m, n, k, r, sms, bn, grads), simulate(m, n, k, r, sms, bn, grads),
                       pb.sm90_gemm_t(m, n, k, r, dev, {"total": 1}, bn, grads), dev)


class OneLaunchModel(unittest.TestCase):
    def test_runs_are_the_launch_and_the_kernel_schedule(self):
        for m, n, _, _, sms in SHAPES:
            for bn in (pb.SM90_BN, pb.SM90_NARROW_BN):
                tiles, runs = kernel_runs(m, n, sms, bn)
                model_tiles, model_runs = pb.sm90_t_runs(m, n, sms, bn)
                self.assertEqual(tiles, model_tiles)
                tiles_n = cdiv(n, bn)
                want = [(len(run), sum(1 for t in run if t == run[0] or t % tiles_n == 0)) for run in runs if run]
                self.assertEqual(model_runs, want, (m, n, sms, bn))

    def test_tensor_work_is_every_wgmma_issued(self):
        for case, (per_cta, _), (_, _, parts, _, work), dev in model_and_simulation():
            self.assertEqual(work, sum(per_cta), case)
            busiest = parts["tensor"] * dev["tensor"] / dev["sms"]
            self.assertAlmostEqual(busiest / max(per_cta), 1.0, places=12, msg=case)

    def test_l2_bytes_are_every_tma_load(self):
        for case, (_, loaded), (_, _, _, l2, _), _ in model_and_simulation():
            self.assertEqual(l2, loaded, case)

    def test_the_simulation_sees_a_change_in_the_kernel(self):
        # a model that forgot dA's products or X's boxes would differ from the simulation with grads
        m, n, k, r, sms = SHAPES[0]
        with_grads, loaded = simulate(m, n, k, r, sms, pb.SM90_BN, True)
        without, loaded_without = simulate(m, n, k, r, sms, pb.SM90_BN, False)
        self.assertGreater(sum(with_grads), sum(without))
        self.assertEqual(loaded - loaded_without, 2 * m * n + 2 * BM * cdiv(r, 16) * 16 * cdiv(m, BM))
        # and the model moves with it: its wgmma work and L2 bytes differ by the simulation's differences
        dev = dict(H100, sms=sms)
        model = {g: pb.sm90_gemm_t(m, n, k, r, dev, {"total": 1}, pb.SM90_BN, g) for g in (True, False)}
        self.assertEqual(model[True][4] - model[False][4], sum(with_grads) - sum(without))
        self.assertEqual(model[True][3] - model[False][3], loaded - loaded_without)


class TileWidth(unittest.TestCase):
    def test_narrow_ranges_at_n_4096_on_132_sms_are_the_readmes(self):
        # README "the Hopper path": M <= 512, 1025-1536, 2049-2560, 3073-3584, 4225-4736, ...
        listed = [(1, 512), (1025, 1536), (2049, 2560), (3073, 3584), (4225, 4736)]
        for m in range(1, 4737 + 64):
            narrow = any(a <= m <= b for a, b in listed)
            self.assertEqual(pb.sm90_bn(m, 4096, 132) == pb.SM90_NARROW_BN, narrow, m)

    def test_mma_tile_choices_are_the_rust_tests(self):
        # tests/lora_ops.rs mma_tile_takes_the_narrow_tiles_where_sms_idle: the same shapes and widths, so the
        # bound's mirror (mma_bn) and ops::mma_tile cannot drift apart unnoticed
        for (m, n, sms), bn in [((256, 4096, 132), 64), ((384, 4096, 132), 128), ((512, 4096, 132), 128),
                                ((8192, 4096, 132), 128), ((256, 4096, 108), 128), ((128, 4096, 108), 64),
                                ((8192, 16, 132), 64), ((8192, 4160, 132), 128), ((4096, 4096, 108), 128)]:
            self.assertEqual(pb.mma_bn(m, n, 1, sms), bn, (m, n, sms))

    def test_mma_launch_model_takes_the_width_and_its_kernel(self):
        narrow = pb.launch_fused("fused_gemm_nn_bf16_f32ad", 256, 4096, 4096, 16, 132)
        self.assertEqual((narrow["kernel"], narrow["blocks"], narrow["slots"]),
                         ("fused_gemm_nn_narrow_bf16_f32ad", 128, 16))
        wide = pb.launch_fused("fused_gemm_nt_bf16", 8192, 4096, 4096, 16, 132)
        self.assertEqual((wide["kernel"], wide["blocks"], wide["slots"]), ("fused_gemm_nt_bf16", 2048, 32))
        # the projection T = X·Aᵀ (N = r = 16): 64 row tiles x 4 K chunks at either width, the narrow
        # kernel for half the padded columns
        proj = pb.launch_grad("fused_gemm_nt_bf16", "lowrank_finalize_bf16", 4096, 8192, 16, 132)[0]
        self.assertEqual((proj["kernel"], proj["blocks"]), ("fused_gemm_nt_narrow_bf16", 256))
        # one row tile over 4 chunks: src/ops/launch.rs small_projection, a block per 32 columns, 16-row
        # group and chunk; over one chunk the fused GEMM writes T itself
        small = pb.launch_grad("fused_gemm_nt_bf16", "lowrank_finalize_bf16", 4096, 64, 40, 132)[0]
        self.assertEqual((small["kernel"], small["blocks"]), ("multi_decode_shrink_bf16", 2 * 4 * 4))
        one = pb.launch_grad("fused_gemm_nt_bf16", "lowrank_finalize_bf16", 1024, 64, 40, 132)
        self.assertEqual((len(one), one[0]["kernel"]), (1, "fused_gemm_nt_narrow_bf16"))



class ManyAdapters(unittest.TestCase):
    def test_decode_batches_take_the_decode_shrink(self):
        # src/ops/multi.rs: up to M = 128 the shrink is multi_decode_shrink, a block per 32 of T's columns,
        # 16-row group, adapter of the group and K chunk (M = 16: r_max = 64, 4 adapters, 4 chunks of
        # K = 4096), reading X and every A once; above M = 128 fused_gemm_multi's shrink on 128-row tiles
        ops = {(m, a): launches for m, a, launches, _, _ in pb.multi_ops(132)}
        shrink, _, fused = ops[(16, 4)]
        self.assertEqual((shrink["kernel"], shrink["blocks"]), ("multi_decode_shrink_bf16", 2 * 4 * 4))
        self.assertEqual(shrink["bytes"], 2 * 16 * 4096 + 2 * (8 + 16 + 64 + 8) * 4096 + 4 * 4 * 16 * 64)
        self.assertEqual(fused["kernel"], "multi_decode_bf16")
        # M = 64, 16 adapters of 4 rows each: 4 groups of 4 adapters
        shrink, _, fused = ops[(64, 16)]
        self.assertEqual((shrink["kernel"], shrink["blocks"]), ("multi_decode_shrink_bf16", 2 * 16 * 4))
        self.assertTrue(fused["kernel"].startswith("fused_gemm_multi_"))
        self.assertTrue(ops[(256, 4)][0]["kernel"].startswith("fused_gemm_multi_"))

if __name__ == "__main__":
    unittest.main()
