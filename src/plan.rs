//! Launch plans: grid, block and dynamic shared memory of one launch, computed once by an op and used
//! unchanged by both backends (so CI, on the emulator, exercises the real launch geometry).

/// Grid/block/shared-memory of one kernel launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem_bytes: u32,
}

impl LaunchPlan {
    /// A 1-D grid-stride launch over `n` elements: `threads` per block, at most `max_blocks` blocks.
    pub fn elementwise(n: usize, threads: u32, max_blocks: u32) -> Self {
        let blocks = n.div_ceil(threads as usize).clamp(1, max_blocks as usize) as u32;
        LaunchPlan {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            smem_bytes: 0,
        }
    }

    pub fn threads_per_block(&self) -> u32 {
        self.block.iter().product()
    }

    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&g| g as u64).product()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_covers_and_caps() {
        let p = LaunchPlan::elementwise(1, 256, 1024);
        assert_eq!((p.grid, p.block), ([1, 1, 1], [256, 1, 1]));
        assert_eq!(LaunchPlan::elementwise(257, 256, 1024).grid[0], 2);
        assert_eq!(LaunchPlan::elementwise(1 << 30, 256, 1024).grid[0], 1024);
    }
}
