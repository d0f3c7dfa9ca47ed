//! What a budget has spent, per period and per calendar window, and its encoding in the ledger's
//! journal.

use super::period::{day_start, month_start, period_start, week_start};
use crate::api::Period;

/// Version 2 added `topped_up`; version 1 records are still read.
const RECORD_VERSION: u8 = 2;

/// What a budget has spent, per period and per usage window. Persisted, except `reserved`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spend {
    pub period_start: u64,
    /// In the current period.
    pub spent: u64,
    /// Added to the limit by top-ups from the parent in the current period.
    pub topped_up: u64,
    /// Reservations in flight (not persisted).
    pub reserved: u64,
    /// Since the budget was created.
    pub total: u64,
    pub day_start: u64,
    pub day: u64,
    pub week_start: u64,
    pub week: u64,
    pub month_start: u64,
    pub month: u64,
}

impl Spend {
    /// The length of [`Spend::encode_into`]'s output.
    pub const ENCODED_LEN: usize = 1 + 8 * 10;

    /// The length of the encoded spend that starts `bytes`, as its version byte says.
    pub fn encoded_len_at(bytes: &[u8]) -> Option<usize> {
        match bytes.first()? {
            1 => Some(1 + 8 * 9),
            2 => Some(Self::ENCODED_LEN),
            _ => None,
        }
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let fields = [
            self.period_start,
            self.spent,
            self.total,
            self.day_start,
            self.day,
            self.week_start,
            self.week,
            self.month_start,
            self.month,
            self.topped_up,
        ];
        out.push(RECORD_VERSION);
        for f in fields {
            out.extend_from_slice(&f.to_le_bytes());
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Spend> {
        let (&version, rest) = bytes.split_first()?;
        if Self::encoded_len_at(bytes) != Some(bytes.len()) {
            return None;
        }
        let f = |i: usize| u64::from_le_bytes(rest[8 * i..8 * i + 8].try_into().unwrap_or_default());
        Some(Spend {
            period_start: f(0),
            spent: f(1),
            reserved: 0,
            total: f(2),
            day_start: f(3),
            day: f(4),
            week_start: f(5),
            week: f(6),
            month_start: f(7),
            month: f(8),
            topped_up: if version >= 2 { f(9) } else { 0 },
        })
    }

    /// Starts the period and the usage windows over when `now` is past their boundaries.
    // Called under the account's lock by every reserve and settle: worth inlining across modules.
    #[inline(always)]
    pub fn roll(&mut self, period: Period, now: u64) {
        let start = period_start(period, now);
        if start != self.period_start {
            self.period_start = start;
            self.spent = 0;
            self.topped_up = 0;
        }
        for (window_start, amount, current) in [
            (&mut self.day_start, &mut self.day, day_start(now)),
            (&mut self.week_start, &mut self.week, week_start(now)),
            (&mut self.month_start, &mut self.month, month_start(now)),
        ] {
            if *window_start != current {
                *window_start = current;
                *amount = 0;
            }
        }
    }
}
