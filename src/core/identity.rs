//! Who a connection belongs to, once the session check has passed. Pure: the checks that
//! produce an [`Identity`] are the transport's ([`crate::transport`]).

use super::ids::{OrgId, UserId};

/// The authenticated owner of a request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    pub org: OrgId,
    /// The login session id (one per login, shared by that login's sockets).
    pub sid: String,
    /// Unix seconds after which the session is over.
    pub exp: u64,
}

impl Identity {
    /// `org/user`: users of different orgs are different people.
    pub fn user_key(&self) -> String {
        format!("{}/{}", self.org, self.user)
    }
}
