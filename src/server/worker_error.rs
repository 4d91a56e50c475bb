//! How a job the compute worker was given can fail, as the worker and the computation report it.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkerError {
    #[error("deadline passed after {completed_steps} steps")]
    DeadlinePassed { completed_steps: usize },
    #[error("the client went away")]
    Cancelled,
    #[error("the queue is full")]
    QueueFull,
    #[error("the worker is not running")]
    Stopped,
    #[error("the adaptation diverged: its logits or architecture weights are not finite")]
    Diverged,
    #[error("the device ran out of memory: {0}")]
    OutOfMemory(String),
    #[error("computation failed: {0}")]
    Failed(String),
}

impl WorkerError {
    /// What an error raised by libtorch inside a job means: running out of memory is the task's
    /// size meeting the device's (the same task may fit later, alone or on a bigger device);
    /// anything else is a fault.
    pub(super) fn raised(message: String) -> WorkerError {
        if message.contains("out of memory") || message.contains("can't allocate memory") {
            WorkerError::OutOfMemory(message)
        } else {
            WorkerError::Failed(message)
        }
    }

    /// The fault a job's `result` shows on our side (for the worker to check the device), if any.
    pub(super) fn fault_of<T>(result: &Result<T, WorkerError>) -> Option<String> {
        match result {
            Err(WorkerError::Failed(message)) => Some(message.clone()),
            _ => None,
        }
    }
}
