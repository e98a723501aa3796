//! qatflow-core: the types every other qatflow crate shares.
//!
//! - [`conversation`]: the OpenAI chat JSONL conversation schema (`{"messages": [...]}`),
//!   with unknown fields preserved on round trip;
//! - [`device`]: where a model runs (`cpu`, `cuda`, `cuda:N`);
//! - [`id`]: a conversation's identity, the sha256 of its canonical JSON;
//! - [`jsonl`]: a line reader that survives bad input (invalid UTF-8, huge lines) and
//!   reports the file and line of every problem;
//! - [`progress`]: the progress sink long-running library functions report to;
//! - [`rng`]: SplitMix64, the one small seedable random generator.

pub mod conversation;
pub mod device;
pub mod id;
pub mod jsonl;
pub mod progress;
pub mod rng;

pub use conversation::{Conversation, FunctionCall, Message, Nullable, Role, ToolCall};
pub use device::{Device, DeviceError};
pub use id::{canonical_json, ConversationId};
pub use jsonl::{JsonlError, JsonlReader, Line, LineProblem};
pub use progress::{NoProgress, Progress};
