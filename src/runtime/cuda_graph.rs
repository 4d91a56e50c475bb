//! CUDA graphs: the kernels of a piece of GPU work, recorded once and replayed with one launch.
//!
//! On a GPU a few-shot adaptation costs the host issuing thousands of tiny kernels per step (about
//! 45 ms a step on an H100, docs/PERFORMANCE.md), not the device running them. A [`Replay`] records
//! the work once for fixed input shapes; each run copies new values into the recorded inputs and
//! relaunches every kernel at once. libtorch's `CUDAGraph` records (through the C++ shim
//! `csrc/cuda_graph.cpp`): the work runs on a side stream, and what it allocates comes from a memory
//! pool the graph keeps, so the recorded outputs stay where the replayed kernels write them.
//!
//! Recordable work reads nothing back to the host and takes no branch on tensor values: the shapes
//! alone decide which kernels run.

use crate::runtime::panics::caught;
use tch::{Device, Tensor};

/// Work recorded as a CUDA graph, with the tensors it reads and writes.
pub struct Replay {
    graph: Graph,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

impl Replay {
    /// Records `work` on copies of `inputs` (all on one CUDA device). It runs once eagerly first, so
    /// lazy initialisation (library handles, cached index tensors) happens outside the recording.
    pub fn record(
        inputs: &[Tensor],
        work: impl Fn(&[Tensor]) -> Vec<Tensor>,
    ) -> Result<Replay, String> {
        let Some(Device::Cuda(device)) = inputs.first().map(Tensor::device) else {
            return Err("CUDA graphs record work on a CUDA device".into());
        };
        let graph = Graph::new(device)?;
        let inputs: Vec<Tensor> = inputs.iter().map(Tensor::copy).collect();
        graph.apply(Step::EnterStream)?;
        let recorded = (|| {
            caught(|| drop(work(&inputs)))?;
            graph.apply(Step::Settle)?;
            graph.apply(Step::CaptureBegin)?;
            let outputs = caught(|| work(&inputs));
            let ended = graph.apply(Step::CaptureEnd);
            let outputs = outputs?;
            ended.map(|()| outputs)
        })();
        let left = graph.apply(Step::LeaveStream);
        match (recorded, left) {
            (Ok(outputs), Ok(())) => Ok(Replay {
                graph,
                inputs,
                outputs,
            }),
            (Err(error), _) | (Ok(_), Err(error)) => {
                graph.abandon();
                Err(error)
            }
        }
    }

    /// Copies `inputs` (the recorded shapes) into the recorded inputs, replays the work, and
    /// returns copies of its outputs, which the next run does not overwrite.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        if inputs.len() != self.inputs.len()
            || inputs
                .iter()
                .zip(&self.inputs)
                .any(|(new, recorded)| new.size() != recorded.size())
        {
            return Err("the inputs' shapes differ from the recorded ones".into());
        }
        caught(|| {
            for (new, recorded) in inputs.iter().zip(&self.inputs) {
                recorded.shallow_clone().copy_(new);
            }
        })?;
        self.graph.apply(Step::Replay)?;
        caught(|| self.outputs.iter().map(Tensor::copy).collect())
    }
}

/// What the shim does to a graph.
#[derive(Clone, Copy)]
enum Step {
    /// Makes the graph's stream current, after the work already queued on the caller's.
    EnterStream,
    /// Restores the caller's stream, ordered after the graph's.
    LeaveStream,
    /// Waits for the graph's stream and returns cached free memory to the device, so the capture
    /// has the room the eager warm-up had.
    Settle,
    CaptureBegin,
    CaptureEnd,
    /// Launches the recorded kernels on the caller's current stream.
    Replay,
}

#[cfg(tnas_cuda_graphs)]
use shim::Graph;

/// The shim's graph: a libtorch `CUDAGraph` and the stream it records on.
#[cfg(tnas_cuda_graphs)]
mod shim {
    use super::Step;
    use std::ffi::{c_char, c_int, c_void, CStr};

    extern "C" {
        fn tnas_graph_new(device: c_int, out: *mut *mut c_void) -> *mut c_char;
        fn tnas_graph_enter_stream(graph: *mut c_void) -> *mut c_char;
        fn tnas_graph_leave_stream(graph: *mut c_void) -> *mut c_char;
        fn tnas_graph_settle(graph: *mut c_void) -> *mut c_char;
        fn tnas_graph_capture_begin(graph: *mut c_void) -> *mut c_char;
        fn tnas_graph_capture_end(graph: *mut c_void) -> *mut c_char;
        fn tnas_graph_abandon_capture(graph: *mut c_void) -> *mut c_char;
        fn tnas_graph_replay(graph: *mut c_void) -> *mut c_char;
        fn tnas_graph_free(graph: *mut c_void);
        fn tnas_graph_free_error(message: *mut c_char);
    }

    /// Owned by one thread: CUDA's current stream, which recording switches, is per thread.
    pub struct Graph(*mut c_void);

    /// The shim's answer: null, or an error message it allocated.
    fn checked(message: *mut c_char) -> Result<(), String> {
        if message.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null answer is a NUL-terminated string from the shim, freed once, here.
        let text = unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned();
        unsafe { tnas_graph_free_error(message) };
        Err(text)
    }

    impl Graph {
        pub fn new(device: usize) -> Result<Graph, String> {
            let mut raw = std::ptr::null_mut();
            // SAFETY: the shim writes a new graph into `raw` or returns an error.
            checked(unsafe { tnas_graph_new(device as c_int, &mut raw) })?;
            Ok(Graph(raw))
        }

        pub fn apply(&self, step: Step) -> Result<(), String> {
            let shim_function: unsafe extern "C" fn(*mut c_void) -> *mut c_char = match step {
                Step::EnterStream => tnas_graph_enter_stream,
                Step::LeaveStream => tnas_graph_leave_stream,
                Step::Settle => tnas_graph_settle,
                Step::CaptureBegin => tnas_graph_capture_begin,
                Step::CaptureEnd => tnas_graph_capture_end,
                Step::Replay => tnas_graph_replay,
            };
            // SAFETY: `self.0` came from `tnas_graph_new` and is freed only in `drop`.
            checked(unsafe { shim_function(self.0) })
        }

        /// After a failed recording: stops libtorch's allocators recording into the capture's
        /// pool, and keeps the graph alive on purpose, as the allocator may still hold callbacks
        /// that refer to it (recording stops after a failure, so this happens once).
        pub fn abandon(self) {
            // SAFETY: as in `apply`.
            let _ = checked(unsafe { tnas_graph_abandon_capture(self.0) });
            std::mem::forget(self);
        }
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            // SAFETY: as in `apply`; nothing uses the graph after this.
            unsafe { tnas_graph_free(self.0) }
        }
    }
}

#[cfg(not(tnas_cuda_graphs))]
use no_shim::Graph;

/// A build whose libtorch has no CUDA (or was built without CUDA headers) records no graphs.
#[cfg(not(tnas_cuda_graphs))]
mod no_shim {
    /// Uninhabited: [`Graph::new`] always fails, so no method below can be reached.
    pub enum Graph {}

    impl Graph {
        pub fn new(_device: usize) -> Result<Graph, String> {
            Err("this build of tnas records no CUDA graphs: its libtorch has no CUDA, or no CUDA headers were found when it was built".into())
        }

        pub fn apply(&self, _step: super::Step) -> Result<(), String> {
            match *self {}
        }

        pub fn abandon(self) {
            match self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn recording_needs_a_cuda_device() {
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let error = Replay::record(&[x], |inputs| vec![&inputs[0] * 2.0])
            .err()
            .expect("no graph on the CPU");
        assert!(error.contains("CUDA device"), "{error}");
    }

    #[test]
    fn a_missing_gpu_is_an_error_message_not_a_crash() {
        if tch::Cuda::is_available() {
            return;
        }
        let error = Graph::new(0).err().expect("no CUDA device to record on");
        assert!(!error.is_empty());
    }

    /// Replays compute what the work computes eagerly, with each run's own inputs.
    #[cfg(tnas_cuda_graphs)]
    #[test]
    fn replays_match_eager_work_on_a_gpu() {
        if !tch::Cuda::is_available() {
            eprintln!("no CUDA device: the replay itself is checked on GPU machines only");
            return;
        }
        let device = Device::Cuda(0);
        let weight = Tensor::randn([8, 8], (Kind::Float, device));
        let work = |inputs: &[Tensor]| {
            vec![inputs[0]
                .matmul(&weight)
                .relu()
                .sum_dim_intlist(1i64, false, Kind::Float)]
        };
        let first = Tensor::randn([4, 8], (Kind::Float, device));
        let replay = Replay::record(&[first.shallow_clone()], work).expect("the work records");
        for _ in 0..3 {
            let x = Tensor::randn([4, 8], (Kind::Float, device));
            let replayed = replay.run(&[x.shallow_clone()]).expect("the graph replays");
            assert!(replayed[0].allclose(&work(&[x])[0], 1e-5, 1e-6, false));
        }
        assert!(
            replay
                .run(&[Tensor::randn([5, 8], (Kind::Float, device))])
                .is_err(),
            "other shapes are refused"
        );
    }
}
