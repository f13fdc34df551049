//! Which family of kernels runs (AVX-512, AVX2 or portable arithmetic),
//! chosen once per process from the CPU, or forced for tests.

#[cfg(target_arch = "x86_64")]
use super::avx2;

/// Which family of kernels runs, chosen once per process from the CPU.
///
/// llama.cpp, built for the machine it runs on, sums some vectors in 16
/// lanes where the CPU has AVX-512 and in 8 lanes where it has AVX2 (the
/// f16 dot products of attention, SwiGLU's `exp`): the bits differ. shoal
/// follows the CPU the same way, so its output matches the llama.cpp of
/// the same machine; the quantized matrix kernels are the same on both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernels {
    /// No AVX2: portable code with the AVX2 kernels' arithmetic.
    Portable,
    /// AVX2, FMA and F16C (x86-64-v3).
    Avx2,
    /// AVX2 plus AVX-512 F/DQ: llama.cpp's AVX-512 arithmetic where it has one.
    Avx512,
}

impl Kernels {
    /// A short name for logs and the status page.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Portable => "portable",
            Kernels::Avx2 => "avx2",
            Kernels::Avx512 => "avx512",
        }
    }

    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            let found = cpu_kernels();
            // SHOAL_KERNELS may ask for another family: a lower one (to
            // match a llama.cpp built for an older CPU, or to test the
            // portable path), or AVX-512's arithmetic on a CPU without it
            // (computed by portable code: same bits, slower).
            match std::env::var("SHOAL_KERNELS").as_deref() {
                Ok("portable") => Kernels::Portable,
                Ok("avx2") => Kernels::Avx2.min(found),
                Ok("avx512") => Kernels::Avx512,
                _ => found,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Kernels::Portable
    }
}

static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The kernel family this process runs (detected once, unless forced).
pub fn kernels() -> Kernels {
    match FORCED.load(std::sync::atomic::Ordering::Relaxed) {
        1 => return Kernels::Portable,
        2 => return Kernels::Avx2.min(cpu_kernels()),
        3 => return Kernels::Avx512,
        _ => {}
    }
    static KERNELS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    *KERNELS.get_or_init(Kernels::detect)
}

/// Makes this process compute with `family`'s arithmetic from now on (AVX-
/// 512's by portable code where the CPU lacks it): for tests held to
/// references made on another CPU. Call before computing anything.
pub fn force_arithmetic(family: Kernels) {
    let v = match family {
        Kernels::Portable => 1,
        Kernels::Avx2 => 2,
        Kernels::Avx512 => 3,
    };
    FORCED.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The best family this CPU's instructions run.
fn cpu_kernels() -> Kernels {
    static CPU: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if !avx2::available() {
                Kernels::Portable
            } else if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
                Kernels::Avx512
            } else {
                Kernels::Avx2
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Kernels::Portable
    })
}

/// Whether this CPU runs AVX-512 instructions (the AVX-512 family's
/// arithmetic is otherwise computed by portable code).
pub fn avx512_cpu() -> bool {
    cpu_kernels() == Kernels::Avx512
}

/// Whether the SIMD kernels (AVX2 or better) run: the CPU has AVX2/FMA/F16C
/// and the portable family was not asked for.
pub fn simd_available() -> bool {
    cpu_kernels() >= Kernels::Avx2 && kernels() != Kernels::Portable
}
