//! Budgets: what answers cost, the credit held for requests in flight, and the ledger of spend.

pub mod cost;
mod journal;
pub mod ledger;
pub mod period;

pub use cost::{Usage, cost, worst_case};
pub use ledger::{Account, Clock, Ledger, RateStatus, Refusal, Reservation, SystemClock};
