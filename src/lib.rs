//! vmexportfs: a read-only FUSE filesystem that exports VM disks from a
//! provider through one token bucket per mount.
//!
//! Data flows one way: FUSE request ([`fuse`]) → filesystem core ([`fs`]) →
//! read path ([`read`]) → throttle ([`throttle`]) → provider ([`provider`]),
//! and bytes flow back. The core never talks to a provider SDK, and a provider
//! never knows about inodes or tokens.

pub mod cli;
pub mod control;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod options;
pub mod provider;
pub mod read;
pub mod size;
pub mod throttle;
