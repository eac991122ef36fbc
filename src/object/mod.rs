//! The object-store repository (`s3://BUCKET/PREFIX`): what a point becomes when it is published to object storage rather than applied to a folder.

pub mod namespace;
