//! Protocol simulators on pty pairs, for users without hardware and for the tests (which
//! use these same simulators). `labgate simulate <kind>` runs one and prints its path.

pub mod emstat;
