// CUDA graph capture and replay over libtorch's at::cuda::CUDAGraph, which tch does not wrap.
//
// A graph owns a stream from libtorch's pool: CUDA graphs cannot be captured on the default stream,
// and the work before a capture (warm-up) must run on the stream the capture will use. Every
// function returns nullptr on success or the error message, freed with tnas_graph_free_error; no
// C++ exception crosses into Rust. Streams, events and guards go through c10's device-generic types,
// which call into libc10_cuda, so the shim needs no CUDA runtime of its own.

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <optional>

namespace {

// `later` runs what is queued on it after everything queued on `earlier` so far.
void order(c10::Stream earlier, c10::Stream later) {
  c10::Event done(c10::DeviceType::CUDA);
  done.record(earlier);
  done.block(later);
}

// libtorch's CUDAGraph leaves its allocators recording into the capture's memory pool when
// capture_end fails (the capture was invalidated); `abandon_capture` ends that, as a successful
// capture_end would have. A pool exists from capture_begin on; a successful end marks it ended.
struct Recorder : at::cuda::CUDAGraph {
  void abandon_capture() {
    if (capture_ended_ || (mempool_id_.first == 0 && mempool_id_.second == 0)) {
      return;
    }
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(capture_dev_, mempool_id_);
    } catch (...) {
    }
    try {
      at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(mempool_id_);
    } catch (...) {
    }
  }
};

struct Graph {
  explicit Graph(c10::Stream stream) : stream(stream) {}

  Recorder graph;
  c10::Stream stream;
  // Set while the graph's stream is the current stream of the calling thread.
  std::optional<c10::StreamGuard> on_stream;
};

c10::Stream current_stream(const Graph* g) {
  return c10::cuda::getCurrentCUDAStream(g->stream.device_index());
}

template <typename F>
char* guarded(F f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return strdup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception");
  }
}

Graph* as_graph(void* graph) {
  return static_cast<Graph*>(graph);
}

}  // namespace

extern "C" {

char* tnas_graph_new(int device, void** out) {
  return guarded([&] {
    *out = new Graph(c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device)));
  });
}

// Makes the graph's stream current; it first waits for the work queued on the caller's stream.
char* tnas_graph_enter_stream(void* graph) {
  return guarded([&] {
    Graph* g = as_graph(graph);
    order(current_stream(g), g->stream);
    g->on_stream.emplace(g->stream);
  });
}

// Restores the caller's stream, which then waits for the work queued on the graph's stream.
char* tnas_graph_leave_stream(void* graph) {
  return guarded([&] {
    Graph* g = as_graph(graph);
    g->on_stream.reset();
    order(g->stream, current_stream(g));
  });
}

// Waits for the graph's stream, then hands the allocator's cached free blocks back to the device:
// memory cached for the warm-up's stream cannot serve the capture, and no cache is emptied while
// a capture runs, so without this a capture can run out of memory where eager work would not.
char* tnas_graph_settle(void* graph) {
  return guarded([&] {
    as_graph(graph)->stream.synchronize();
    c10::cuda::CUDACachingAllocator::emptyCache();
  });
}

char* tnas_graph_capture_begin(void* graph) {
  return guarded([&] { as_graph(graph)->graph.capture_begin(); });
}

char* tnas_graph_capture_end(void* graph) {
  return guarded([&] { as_graph(graph)->graph.capture_end(); });
}

// After a failed recording: stops the allocators recording into the capture's pool, if any.
char* tnas_graph_abandon_capture(void* graph) {
  return guarded([&] { as_graph(graph)->graph.abandon_capture(); });
}

char* tnas_graph_replay(void* graph) {
  return guarded([&] { as_graph(graph)->graph.replay(); });
}

void tnas_graph_free(void* graph) {
  delete as_graph(graph);
}

void tnas_graph_free_error(char* message) {
  std::free(message);
}

}  // extern "C"
