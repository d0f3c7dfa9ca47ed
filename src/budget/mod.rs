//! Budgets: what answers cost, the credit held for requests in flight, and the ledger of spend.

pub mod cost;
pub mod fleet;
mod journal;
pub mod lease;
mod ledger;
pub mod period;
pub mod protocol;
mod spend;

pub use cost::{cost, worst_case};
pub use journal::Damage;
pub use ledger::{Account, BudgetCounters, Clock, Ledger, Level, RateStatus, Refusal, Reservation, SystemClock};
pub use spend::Spend;
