//! hearth's provisioning pipeline: the ordered steps that turn a booted VM
//! into a warm one (`create_vm` … `warm_pool_setup`), with output and timing.
//!
//! Empty until the provisioning issue.
