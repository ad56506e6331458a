//! Table-driven decision cases.
