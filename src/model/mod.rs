//! A model on disk (`models/<name>/`, docs/MODEL_FORMAT.md): what `model.json` records, the
//! adaptation settings it and requests share, and loading, verifying and atomically saving it.

pub mod checkpoint;
pub mod metadata;
pub mod settings;
