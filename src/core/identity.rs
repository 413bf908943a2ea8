//! Who a connection belongs to, once the session check has passed. Pure: the checks that
//! produce an [`Identity`] are the transport's ([`crate::transport`]).

use super::ids::{OrgId, UserId};

/// The authenticated owner of a request.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) user: UserId,
    pub(crate) org: OrgId,
    /// The login session id (one per login, shared by that login's sockets).
    pub(crate) sid: String,
    /// Unix seconds after which the session is over.
    pub(crate) exp: u64,
}

impl Identity {
    /// `org/user`: users of different orgs are different people.
    pub(crate) fn user_key(&self) -> String {
        format!("{}/{}", self.org, self.user)
    }
}
