//! Who is asking and what may they do: API tokens with hashed secrets, ACL privileges with
//! PVE's path propagation, and the short-lived tunnel tickets that bind a user to a socket.
//!
//! Nothing here speaks HTTP; the API layer passes header values in and gets an authid or a
//! yes/no back.

pub mod acl;
pub mod ticket;
pub mod token;

pub use acl::{Acl, AclEntry, Privilege};
pub use ticket::TicketKey;
pub use token::{AuthError, TokenStore};
