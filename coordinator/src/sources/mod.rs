//! Where host declarations come from. Only files mode exists so far; Kubernetes mode will sit
//! beside it and feed the controller the same [`files::Snapshot`]-shaped information.

pub mod files;
