//! What a sidecar does only in a cluster: budgets leased from the operator's ledger ([`fleet`],
//! over [`ledger_client`]), and the operator's configuration stream with the health reports sent
//! back on it ([`push`]).

pub mod fleet;
pub mod ledger_client;
pub mod push;
