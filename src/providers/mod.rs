//! Wire protocols of upstream providers, one module per format.

pub mod openai;
