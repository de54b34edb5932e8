//! Whether this build's kernels can run on a GPU, said before the first launch instead of as a module-load
//! error in the middle of an op. build.rs records what nvcc built: SASS for each requested architecture
//! and PTX for the lowest (`LK_BUILT_ARCHS`), and the CUDA version of that nvcc (`LK_NVCC_CUDA_VERSION`).
//!
//! The rules are CUDA's: SASS built for sm_XY runs on a GPU of the same major version X with minor ≥ Y
//! (sm_80 code on an sm_86 card, not on sm_90); PTX for compute_XY is compiled by the driver for any GPU
//! of capability ≥ XY, and only by a driver at least as new as the nvcc that wrote it (a newer PTX ISA
//! is refused: CUDA_ERROR_UNSUPPORTED_PTX_VERSION). The sm_90a kernels are taken only on sm_90
//! (`ops::sm90`), so they do not enter here.

/// The architectures this build has SASS for (e.g. `[80, 86, 89, 90]`), ascending; empty without nvcc.
pub(crate) fn built_archs() -> Vec<u32> {
    parse_archs(env!("LK_BUILT_ARCHS"))
}

/// The CUDA version of the nvcc that built the kernels, `(major, minor)`, when build.rs could read it.
pub(crate) fn nvcc_cuda_version() -> Option<(u32, u32)> {
    parse_version(env!("LK_NVCC_CUDA_VERSION"))
}

fn parse_archs(list: &str) -> Vec<u32> {
    let mut archs: Vec<u32> = list
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    archs.sort_unstable();
    archs
}

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A driver's `cuDriverGetVersion` (1000·major + 10·minor) as "12.4".
fn driver_text(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// How the kernels would reach a GPU of capability `cc` (e.g. 86): through SASS built for it or for an
/// older minor of its major version, else through the driver compiling the lowest architecture's PTX,
/// else not at all (the message says why and what to rebuild with).
pub(crate) fn route(cc: u32, archs: &[u32]) -> Result<Route, String> {
    if let Some(&sass) = archs
        .iter()
        .filter(|&&a| a / 10 == cc / 10 && a <= cc)
        .max()
    {
        return Ok(Route::Sass(sass));
    }
    match archs.first() {
        Some(&lowest) if lowest <= cc => Ok(Route::Ptx(lowest)),
        _ => Err(format!(
            "the GPU is sm_{cc}, and this build's kernels are SASS for {} and PTX for compute_{}, none of \
             which runs on it: rebuild with LK_CUDA_ARCHS naming {cc} (README, \"How nvcc and a GPU are found\")",
            archs
                .iter()
                .map(|a| format!("sm_{a}"))
                .collect::<Vec<_>>()
                .join(", "),
            archs.first().copied().unwrap_or(0)
        )),
    }
}

/// Which of the embedded codes a GPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// SASS built for this architecture (or an older minor of its major version).
    Sass(u32),
    /// The lowest architecture's PTX, compiled by the driver when a module is first loaded.
    Ptx(u32),
}

/// The line a module-load failure carries, so that its cause can be told without a debugger: the GPU's
/// architecture, the code it takes, the driver's CUDA version and nvcc's, and, where the driver is too
/// old for that code, that it is (the usual cause).
pub(crate) fn load_context(
    cc: u32,
    archs: &[u32],
    driver: Option<i32>,
    nvcc: Option<(u32, u32)>,
) -> String {
    let route = route(cc, archs);
    let code = match route {
        Ok(Route::Sass(a)) => format!("its SASS for sm_{a}"),
        Ok(Route::Ptx(a)) => format!("the PTX for compute_{a}, compiled by the driver"),
        Err(_) => "no code built for it".into(),
    };
    let driver_cuda = driver.map_or("unknown".into(), driver_text);
    let built_by = nvcc.map_or("an nvcc of unknown version".into(), |(a, b)| {
        format!("nvcc {a}.{b}")
    });
    let mut s = format!(
        "the GPU (sm_{cc}) takes {code}; the driver supports CUDA {driver_cuda}; the kernels were built by {built_by}"
    );
    if let (Some(d), Some((major, minor))) = (driver, nvcc) {
        // SASS loads on any driver of nvcc's major version (CUDA's minor version compatibility); PTX needs
        // a driver at least as new as nvcc
        let (need_major, need_minor) = match route {
            Ok(Route::Sass(_)) => (major, 0),
            _ => (major, minor),
        };
        if d < (need_major * 1000 + need_minor * 10) as i32 {
            s.push_str(&format!(
                ": a driver for CUDA {need_major}.{need_minor} or newer is needed to load that code (update \
                 the driver, or build with an nvcc no newer than the driver's CUDA {})",
                driver_text(d)
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_records_what_nvcc_built() {
        // whatever this build is, the two records agree with each other
        let archs = built_archs();
        assert_eq!(archs.is_empty(), !crate::kernel::cuda_compiled());
        if crate::kernel::cuda_compiled() {
            assert!(nvcc_cuda_version().is_some(), "nvcc's version not recorded");
        }
    }

    #[test]
    fn parsing() {
        assert_eq!(parse_archs("90,80, 86,89"), vec![80, 86, 89, 90]);
        assert_eq!(parse_archs(""), Vec::<u32>::new());
        assert_eq!(parse_version("13.0"), Some((13, 0)));
        assert_eq!(parse_version("12.10"), Some((12, 10)));
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("13"), None);
        assert_eq!(driver_text(13000), "13.0");
        assert_eq!(driver_text(12040), "12.4");
    }

    #[test]
    fn sass_within_a_major_version_ptx_forward() {
        let default = [80, 86, 89, 90];
        assert_eq!(route(80, &default), Ok(Route::Sass(80)));
        assert_eq!(route(87, &default), Ok(Route::Sass(86)));
        assert_eq!(route(89, &default), Ok(Route::Sass(89)));
        assert_eq!(route(90, &default), Ok(Route::Sass(90)));
        // a newer major version: the driver compiles compute_80's PTX
        assert_eq!(route(100, &default), Ok(Route::Ptx(80)));
        assert_eq!(route(120, &default), Ok(Route::Ptx(80)));
        // sm_86 SASS does not run on sm_80; the PTX for compute_86 neither
        let e = route(80, &[86, 90]).unwrap_err();
        assert!(
            e.contains("sm_80") && e.contains("LK_CUDA_ARCHS naming 80"),
            "{e}"
        );
        // an sm_90-only build on an A100
        let e = route(80, &[90]).unwrap_err();
        assert!(e.contains("SASS for sm_90 and PTX for compute_90"), "{e}");
        // and on a Hopper card, an sm_80-only build runs its PTX
        assert_eq!(route(90, &[80]), Ok(Route::Ptx(80)));
    }

    #[test]
    fn a_load_failure_names_the_likely_cause() {
        let s = load_context(90, &[80, 90], Some(12040), Some((13, 0)));
        assert!(s.contains("SASS for sm_90"), "{s}");
        assert!(s.contains("CUDA 12.4") && s.contains("nvcc 13.0"), "{s}");
        assert!(
            s.contains("a driver for CUDA 13.0 or newer is needed"),
            "{s}"
        );
        let s = load_context(100, &[80, 90], Some(13000), Some((13, 0)));
        assert!(s.contains("PTX for compute_80"), "{s}");
        assert!(
            !s.contains("is needed"),
            "a new enough driver is not blamed: {s}"
        );
        // a 13.2 nvcc: its SASS loads on a 13.0 driver, its PTX does not
        let s = load_context(90, &[80, 90], Some(13000), Some((13, 2)));
        assert!(!s.contains("is needed"), "{s}");
        let s = load_context(100, &[80, 90], Some(13000), Some((13, 2)));
        assert!(
            s.contains("a driver for CUDA 13.2 or newer is needed"),
            "{s}"
        );
        let s = load_context(90, &[90], None, None);
        assert!(
            s.contains("CUDA unknown") && s.contains("unknown version"),
            "{s}"
        );
    }
}
