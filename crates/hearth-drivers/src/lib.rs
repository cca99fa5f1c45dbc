//! hearth's VM drivers behind one small trait: sandbox (Linux namespaces),
//! qemu (microVMs) and fake (in memory, for simulation).
//!
//! Empty until the pool issue. **Invariant (binding when it fills):** drivers
//! never touch the store; they report what really exists and their own errors.
