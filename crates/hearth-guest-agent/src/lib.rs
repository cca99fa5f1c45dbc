//! hearth's guest agent: the small process inside every VM that runs
//! commands and writes files for the provisioning pipeline.
//!
//! Empty until the provisioning issue, which makes it a binary of its own.
