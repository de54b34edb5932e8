//! A many-adapter batch (ops::lora_forward_multi): random inputs, the set of its adapters, a run with
//! both outputs poisoned, and the f64 reference.

use lora_kernels::ops::{Workspace, lora_forward_multi_into};
use lora_kernels::reference::{self, MultiAdapter};
use lora_kernels::{AdapterIndex, AdapterSet, Device, Element, Tensor};

use super::Rng;

/// A batch: X (m×k), W0 (n×k), bias, the adapters (A, B, rank, scale) and each row's adapter.
pub struct Batch<T: Element, A: Element> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x: Vec<T>,
    pub w0: Vec<T>,
    pub bias: Option<Vec<T>>,
    pub adapters: Vec<HostAdapter<A>>,
    pub rows: Vec<Option<usize>>,
}

/// A, B, rank, scale.
pub type HostAdapter<A> = (Vec<A>, Vec<A>, usize, f32);

pub fn random_adapter<A: Element>(rng: &mut Rng, n: usize, k: usize, r: usize) -> HostAdapter<A> {
    let a = rng.vec::<A>(r * k, 1.0 / (k as f64).sqrt());
    let b = rng.vec::<A>(n * r, 1.0 / (r as f64).sqrt());
    // |s| in [0.25, 2], either sign (a sign lost in the per-row scaling would show)
    let magnitude = (0.25 + 1.75 * (rng.uniform() * 0.5 + 0.5)) as f32;
    let scale = if rng.next_u64() % 2 == 0 {
        magnitude
    } else {
        -magnitude
    };
    (a, b, r, scale)
}

pub fn random_rank(rng: &mut Rng) -> usize {
    // the edges (1, 16, 17, 128) as often as the rest
    match rng.next_u64() % 8 {
        0 => 1,
        1 => 16,
        2 => 17,
        3 => 128,
        _ => 1 + (rng.next_u64() % 128) as usize,
    }
}

impl<T: Element, A: Element> Batch<T, A> {
    /// X, W0 and the bias on `dev`.
    pub fn layer_on(&self, dev: &Device) -> (Tensor<T>, Tensor<T>, Option<Tensor<T>>) {
        let x = Tensor::from_slice(dev, &self.x, &[self.m, self.k]).unwrap();
        let w0 = Tensor::from_slice(dev, &self.w0, &[self.n, self.k]).unwrap();
        let bias = self
            .bias
            .as_ref()
            .map(|v| Tensor::from_slice(dev, v, &[self.n]).unwrap());
        (x, w0, bias)
    }

    /// `adapters` adapters of random ranks ([`random_rank`]).
    pub fn random(rng: &mut Rng, dims: (usize, usize, usize), adapters: usize, bias: bool) -> Self {
        let ranks: Vec<usize> = (0..adapters).map(|_| random_rank(rng)).collect();
        Self::with_ranks(rng, dims, &ranks, bias)
    }

    /// Adapters of these ranks, random rows (grouped runs or every row its own draw, some without an
    /// adapter), X, W0 and the bias.
    pub fn with_ranks(
        rng: &mut Rng,
        (m, n, k): (usize, usize, usize),
        ranks: &[usize],
        bias: bool,
    ) -> Self {
        let adapters: Vec<_> = ranks
            .iter()
            .map(|&r| random_adapter::<A>(rng, n, k, r))
            .collect();
        // grouped runs of one adapter (as servers batch requests), some single rows, some rows without
        let mut rows = Vec::with_capacity(m);
        while rows.len() < m {
            let run = 1 + (rng.next_u64() % 40) as usize;
            let a = match rng.next_u64() % 6 {
                0 => None,
                _ => Some((rng.next_u64() % adapters.len() as u64) as usize),
            };
            rows.extend(std::iter::repeat_n(a, run.min(m - rows.len())));
        }
        if rng.next_u64() % 2 == 0 {
            // unsorted: every row its own draw
            for r in rows.iter_mut() {
                *r = if rng.next_u64() % 7 == 0 {
                    None
                } else {
                    Some((rng.next_u64() % adapters.len() as u64) as usize)
                };
            }
        }
        Batch {
            m,
            n,
            k,
            x: rng.vec::<T>(m * k, 1.0),
            w0: rng.vec::<T>(n * k, 1.0 / (k as f64).sqrt()),
            bias: bias.then(|| rng.vec::<T>(n, 0.5)),
            adapters,
            rows,
        }
    }

    pub fn reference(&self, r_max: usize) -> reference::Forward {
        let ad: Vec<MultiAdapter<'_, A>> = self
            .adapters
            .iter()
            .map(|(a, b, r, s)| (a.as_slice(), b.as_slice(), *r, *s as f64))
            .collect();
        reference::forward_multi_as_kernels(
            &self.x,
            &self.w0,
            self.bias.as_deref(),
            &ad,
            &self.rows,
            (self.m, self.n, self.k),
            r_max,
        )
    }
}

/// The set of `b`'s adapters on `dev` (slot i = adapter i).
pub fn set_of<T: Element, A: Element>(dev: &Device, b: &Batch<T, A>) -> AdapterSet<A> {
    let mut set = AdapterSet::<A>::new(dev, b.n, b.k).unwrap();
    for (i, (a, bb, r, s)) in b.adapters.iter().enumerate() {
        let at = Tensor::from_slice(dev, a, &[*r, b.k]).unwrap();
        let bt = Tensor::from_slice(dev, bb, &[b.n, *r]).unwrap();
        assert_eq!(set.add(&at, &bt, *s).unwrap(), i as u32);
    }
    set
}

/// Y and T of the multi-adapter forward on `dev`, both poisoned before the launches.
pub fn run<T: Element, A: Element>(
    dev: &Device,
    b: &Batch<T, A>,
    set: &AdapterSet<A>,
) -> (Vec<T>, Vec<T>) {
    let rows: Vec<Option<u32>> = b.rows.iter().map(|r| r.map(|a| a as u32)).collect();
    let index = AdapterIndex::new(set, &rows).unwrap();
    let (x, w0, bias) = b.layer_on(dev);
    let mut y = Tensor::<T>::zeros(dev, &[b.m, b.n]).unwrap();
    let mut t = Tensor::<T>::zeros(dev, &[b.m, set.max_rank()]).unwrap();
    y.poison().unwrap();
    t.poison().unwrap();
    lora_forward_multi_into(
        &x,
        &w0,
        bias.as_ref(),
        set,
        &index,
        &mut y,
        &mut t,
        &mut Workspace::new(),
    )
    .unwrap();
    (y.to_vec().unwrap(), t.to_vec().unwrap())
}
