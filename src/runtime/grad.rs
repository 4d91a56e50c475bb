//! Gradient-mode scoping that survives panics.
//!
//! `tch::no_grad` restores the thread's grad mode only when its closure returns; a libtorch error
//! inside it (a panic) leaves gradients off for the rest of the thread's life. The server's worker
//! catches such panics and goes on serving, so every no-grad scope here restores the mode on unwind.

/// Runs `f` without recording gradients; the previous mode comes back even if `f` panics.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _restore_on_drop = tch::no_grad_guard();
    f()
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    #[test]
    fn grad_mode_comes_back_after_a_panic() {
        let panicked =
            std::panic::catch_unwind(|| super::no_grad(|| Tensor::from_slice(&[3i64]).one_hot(2)));
        assert!(panicked.is_err(), "libtorch refuses class 3 of 2");
        let x = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        assert!((&x * 2).requires_grad(), "gradients are recorded again");
    }
}
