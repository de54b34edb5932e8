// planted_pipeline.cu (test-only): a two-stage producer/consumer ring on mbarriers and bulk copies (the
// Hopper pipeline's synchronisation, lk_mbarrier.cuh), with one planted protocol bug per `bug` value; with
// bug = 0 it is correct. tests/emulator_checks.rs requires the correct one to run clean under every thread
// order and each planted one to fail with a message naming the problem.
//
// 96 threads, 2 KB of stages + 5 mbarriers + 16 bytes: warp 0's lane 0 produces (the other lanes exit after the setup), warps 1 and 2 (64 threads)
// consume. Tile t (256 floats of x) goes to stage t % 2 as two 512-byte bulk copies completing on full[s];
// consumer c adds the 4 floats of consumer (c + 32) % 64 (a thread of the other warp), then arrives on
// empty[s]; the producer waits for empty[s] before it refills the stage.
#include "lk_mbarrier.cuh"

struct PipelineParams {
    const float* x;
    float* y;
    int n;
    int bug;
};

enum PipelineBug {
    PB_NONE = 0,
    PB_NO_FULL_WAIT = 1,        // consumers read the stage without waiting for its full barrier
    PB_EXPECT_TOO_MANY = 2,     // arrive.expect_tx announces 16 bytes more than the copies deliver
    PB_EXPECT_TOO_FEW = 3,      // ... 512 bytes fewer: the phase completes after the first copy
    PB_RELEASE_BEFORE_READ = 4, // consumers arrive on empty before reading: the refill overwrites their data
    PB_NO_INIT_BARRIER = 5,     // no __syncthreads between mbarrier.init and the other threads' use
    PB_WRONG_PARITY = 6,        // consumers always wait for parity 0
    PB_PLAIN_ACCESS = 7,        // a consumer reads the mbarrier object with a plain load
    PB_UNWAITED_COPY = 8,       // a consumer issues a last bulk copy that nobody waits for before the exit
    PB_WRONG_STAGE = 9,         // consumers wait for full[s] but read the other stage
};

constexpr int kTile = 256;  // floats per tile
constexpr int kStages = 2;

extern "C" __global__ void planted_pipeline_mbarrier(PipelineParams p) {
    LK_KERNEL_ENTRY();
    LK_DYNAMIC_SMEM(smem);
    float* stage = reinterpret_cast<float*>(smem);                        // [kStages][kTile]
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kTile * 4);  // [kStages]
    uint64_t* empty = full + kStages;                                     // [kStages]
    uint64_t* spare = empty + kStages;                                    // for PB_UNWAITED_COPY
    float* scratch = reinterpret_cast<float*>(spare + 2);                 // 16 bytes
    const int tid = threadIdx.x, tiles = p.n / kTile;
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) {
            lk_mbarrier_init(&full[s], 1);
            lk_mbarrier_init(&empty[s], 64);
        }
        lk_mbarrier_init(spare, 1);
        lk_fence_mbarrier_init();
    }
    if (p.bug != PB_NO_INIT_BARRIER) __syncthreads();
    if (tid < 32) {
        if (tid != 0) return;
        for (int t = 0; t < tiles; ++t) {
            const int s = t % kStages, lap = t / kStages;
            lk_mbarrier_wait_parity(&empty[s], uint32_t(lap & 1) ^ 1u);  // lap 0: the phase before the first
            const uint32_t bytes = p.bug == PB_EXPECT_TOO_MANY ? kTile * 4 + 16
                                   : p.bug == PB_EXPECT_TOO_FEW ? kTile * 2
                                                                : kTile * 4;
            lk_mbarrier_arrive_expect_tx(&full[s], bytes);
            for (int h = 0; h < 2; ++h)
                lk_bulk_copy_g2s(stage + s * kTile + h * kTile / 2, p.x + t * kTile + h * kTile / 2, kTile * 2,
                                 &full[s]);
        }
        return;
    }
    const int c = tid - 32, other = (c + 32) % 64;
    float acc = 0.f;
    for (int t = 0; t < tiles; ++t) {
        const int s = t % kStages, lap = t / kStages;
        if (p.bug == PB_PLAIN_ACCESS && c == 5) acc += float(*reinterpret_cast<volatile uint64_t*>(&full[s]) & 1u);
        if (p.bug != PB_NO_FULL_WAIT) lk_mbarrier_wait_parity(&full[s], p.bug == PB_WRONG_PARITY ? 0u : uint32_t(lap & 1));
        if (p.bug == PB_RELEASE_BEFORE_READ) lk_mbarrier_arrive(&empty[s]);
        const float* chunk = stage + (p.bug == PB_WRONG_STAGE ? s ^ 1 : s) * kTile + 4 * other;
        for (int j = 0; j < 4; ++j) acc += chunk[j];
        if (p.bug != PB_RELEASE_BEFORE_READ) lk_mbarrier_arrive(&empty[s]);
    }
    // the last tiles' copies have all landed: every consumer waited for them
    if (p.bug == PB_UNWAITED_COPY && c == 0) lk_bulk_copy_g2s(scratch, p.x, 16, spare);
    p.y[c] = acc;
}
LK_KERNEL_EXPORT(planted_pipeline_mbarrier, PipelineParams)
