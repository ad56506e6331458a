//! The allowlist as the decision sees it: an immutable, indexed snapshot of S2S app entries, their
//! application users, security roles, users (for impersonation) and routes.
//!
//! A snapshot is built once (from configuration now, from the registry store later), validated as a
//! whole, and then only read; the allowlist cache swaps whole snapshots so a decision never sees half an edit.

use super::FastMap;
use super::ids::{ClientAppId, ObjectId, SpiffeId, TenantId};
use std::collections::{BTreeSet, HashMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppEntryKind {
    ClientCredentials,
    ManagedIdentity,
}

/// One allowlisted calling application in one tenant.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppEntry {
    pub name: String,
    pub tenant_id: TenantId,
    pub client_app_id: Option<ClientAppId>,
    /// The service principal's object id; how managed identities are recognised.
    pub object_id: Option<ObjectId>,
    pub kind: AppEntryKind,
    /// The app role the token's `roles` must contain, if any.
    pub required_role: Option<String>,
    pub enabled: bool,
    /// The workloads (SPIFFE ids, Envoy's `source.principal`) this application may call from. When
    /// non-empty, a request must come from one of them; empty, any source will do unless the settings
    /// require a source principal for every entry. Absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_principals: Vec<SpiffeId>,
}

/// The non-interactive user an application acts as (Dataverse-style), holding one custom security role.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplicationUser {
    pub id: String,
    pub name: String,
    pub entry_name: String,
    pub security_role: String,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Read,
    Create,
    Write,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Create => "create",
            Self::Write => "write",
            Self::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecurityRole {
    pub name: String,
    /// resource → operations granted on it.
    pub privileges: HashMap<String, BTreeSet<Operation>>,
    /// May impersonate users (Dataverse's `prvActOnBehalfOfAnotherUser`).
    pub act_on_behalf: bool,
    /// Out-of-the-box roles cannot be held by application users.
    pub builtin: bool,
}

impl SecurityRole {
    pub fn grants(&self, resource: &str, operation: Operation) -> bool {
        self.privileges
            .get(resource)
            .is_some_and(|ops| ops.contains(&operation))
    }
}

/// A user an application may act on behalf of (header `callerobjectid`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    pub object_id: ObjectId,
    pub name: String,
    pub security_role: String,
}

/// Maps requests to a resource and an operation. `path` is a prefix matched on segment boundaries, in
/// which a `*` segment matches any one segment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// Stable identifier for administration; not used by decisions.
    pub id: String,
    /// Upper-case HTTP method, or `None` for any.
    pub method: Option<String>,
    pub path: String,
    pub resource: String,
    pub operation: Operation,
}

impl Route {
    fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').filter(|s| !s.is_empty())
    }

    /// How specific the route is: literal characters count more than wildcards, so the longest match wins.
    fn specificity(&self) -> (usize, usize) {
        let literal = self.segments().filter(|s| *s != "*").map(str::len).sum();
        (literal, self.segments().count())
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        if let Some(m) = &self.method
            && !m.eq_ignore_ascii_case(method)
        {
            return false;
        }
        let mut request = path.split('/').filter(|s| !s.is_empty());
        self.segments().all(|pattern| match request.next() {
            Some(seg) => pattern == "*" || pattern == seg,
            None => false,
        })
    }
}

/// Why a set of entries, users, roles and routes cannot form a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("app entry `{0}` is defined twice")]
    DuplicateEntryName(String),
    #[error("app entries `{first}` and `{second}` both claim tenant `{tenant}` and {key}")]
    DuplicateIdentity {
        first: String,
        second: String,
        tenant: String,
        key: String,
    },
    #[error("app entry `{0}`: {1}")]
    InvalidEntry(String, &'static str),
    #[error("security role `{0}` is defined twice")]
    DuplicateRole(String),
    #[error("application user of `{entry}` holds unknown security role `{role}`")]
    UnknownRole { entry: String, role: String },
    #[error(
        "application user of `{entry}` holds builtin role `{role}`: application users need a custom role"
    )]
    BuiltinRole { entry: String, role: String },
    #[error("app entry `{0}` has no application user, or more than one")]
    ApplicationUserCount(String),
    #[error("application user refers to unknown app entry `{0}`")]
    OrphanApplicationUser(String),
    #[error("user `{user}` holds unknown security role `{role}`")]
    UnknownUserRole { user: String, role: String },
    #[error("route `{0}` must start with `/`")]
    InvalidRoute(String),
    #[error("user `{0}` is defined twice")]
    DuplicateUser(String),
    #[error("route `{0}` is defined twice")]
    DuplicateRoute(String),
}

/// The registry as plain lists: what configuration provisions, what the store holds, and their union.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryParts {
    pub entries: Vec<AppEntry>,
    pub app_users: Vec<ApplicationUser>,
    pub roles: Vec<SecurityRole>,
    pub users: Vec<User>,
    pub routes: Vec<Route>,
}

impl RegistryParts {
    /// Both sets of parts together; duplicates are left for `RegistrySnapshot::from_parts` to refuse.
    pub fn merged(&self, other: &RegistryParts) -> RegistryParts {
        fn join<T: Clone>(a: &[T], b: &[T]) -> Vec<T> {
            a.iter().chain(b).cloned().collect()
        }
        RegistryParts {
            entries: join(&self.entries, &other.entries),
            app_users: join(&self.app_users, &other.app_users),
            roles: join(&self.roles, &other.roles),
            users: join(&self.users, &other.users),
            routes: join(&self.routes, &other.routes),
        }
    }
}

/// A borrowed `(tenant, id)` index key: hashes as the owned tuple does (a tuple hashes its fields in
/// order, a reference as what it points to), so a lookup copies neither id.
#[derive(Hash)]
struct InTenant<'a, I>(&'a TenantId, &'a I);

impl<I: PartialEq> hashbrown::Equivalent<(TenantId, I)> for InTenant<'_, I> {
    fn equivalent(&self, key: &(TenantId, I)) -> bool {
        *self.0 == key.0 && *self.1 == key.1
    }
}

/// Everything the allowlist stage of a decision needs, indexed for constant-time lookups.
#[derive(Clone, Debug, Default)]
pub struct RegistrySnapshot {
    entries: Vec<AppEntry>,
    by_client: FastMap<(TenantId, ClientAppId), usize>,
    by_object: FastMap<(TenantId, ObjectId), usize>,
    app_users: FastMap<String, ApplicationUser>,
    roles: FastMap<String, SecurityRole>,
    users: FastMap<ObjectId, User>,
    /// Most specific first.
    routes: Vec<Route>,
}

impl RegistrySnapshot {
    pub fn from_parts(parts: RegistryParts) -> Result<Self, RegistryError> {
        Self::build(
            parts.entries,
            parts.app_users,
            parts.roles,
            parts.users,
            parts.routes,
        )
    }

    pub fn build(
        entries: Vec<AppEntry>,
        app_users: Vec<ApplicationUser>,
        roles: Vec<SecurityRole>,
        users: Vec<User>,
        mut routes: Vec<Route>,
    ) -> Result<Self, RegistryError> {
        let mut snapshot = RegistrySnapshot::default();
        for role in roles {
            if snapshot.roles.contains_key(&role.name) {
                return Err(RegistryError::DuplicateRole(role.name));
            }
            snapshot.roles.insert(role.name.clone(), role);
        }
        let mut names = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            if names.insert(entry.name.clone(), index).is_some() {
                return Err(RegistryError::DuplicateEntryName(entry.name.clone()));
            }
            match (entry.kind, &entry.client_app_id, &entry.object_id) {
                (AppEntryKind::ClientCredentials, None, _) => {
                    return Err(RegistryError::InvalidEntry(
                        entry.name.clone(),
                        "a CLIENT_CREDENTIALS entry needs a client_app_id",
                    ));
                }
                (AppEntryKind::ManagedIdentity, _, None) => {
                    return Err(RegistryError::InvalidEntry(
                        entry.name.clone(),
                        "a MANAGED_IDENTITY entry needs an object_id",
                    ));
                }
                _ => {}
            }
            let duplicate = |other: usize, key: String| RegistryError::DuplicateIdentity {
                first: entries[other].name.clone(),
                second: entry.name.clone(),
                tenant: entry.tenant_id.to_string(),
                key,
            };
            match entry.kind {
                AppEntryKind::ClientCredentials => {
                    if let Some(app) = &entry.client_app_id {
                        let key = (entry.tenant_id.clone(), app.clone());
                        if let Some(other) = snapshot.by_client.insert(key, index) {
                            return Err(duplicate(other, format!("client app id `{app}`")));
                        }
                    }
                }
                AppEntryKind::ManagedIdentity => {
                    if let Some(oid) = &entry.object_id {
                        let key = (entry.tenant_id.clone(), oid.clone());
                        if let Some(other) = snapshot.by_object.insert(key, index) {
                            return Err(duplicate(other, format!("object id `{oid}`")));
                        }
                    }
                }
            }
        }
        for user in app_users {
            if !names.contains_key(&user.entry_name) {
                return Err(RegistryError::OrphanApplicationUser(user.entry_name));
            }
            match snapshot.roles.get(&user.security_role) {
                None => {
                    return Err(RegistryError::UnknownRole {
                        entry: user.entry_name,
                        role: user.security_role,
                    });
                }
                Some(role) if role.builtin => {
                    return Err(RegistryError::BuiltinRole {
                        entry: user.entry_name,
                        role: user.security_role,
                    });
                }
                Some(_) => {}
            }
            if snapshot.app_users.contains_key(&user.entry_name) {
                return Err(RegistryError::ApplicationUserCount(user.entry_name));
            }
            snapshot.app_users.insert(user.entry_name.clone(), user);
        }
        if let Some(entry) = entries
            .iter()
            .find(|e| !snapshot.app_users.contains_key(&e.name))
        {
            return Err(RegistryError::ApplicationUserCount(entry.name.clone()));
        }
        for user in users {
            if !snapshot.roles.contains_key(&user.security_role) {
                return Err(RegistryError::UnknownUserRole {
                    user: user.name,
                    role: user.security_role,
                });
            }
            if snapshot.users.contains_key(&user.object_id) {
                return Err(RegistryError::DuplicateUser(user.object_id.to_string()));
            }
            snapshot.users.insert(user.object_id.clone(), user);
        }
        if let Some(bad) = routes.iter().find(|r| !r.path.starts_with('/')) {
            return Err(RegistryError::InvalidRoute(bad.path.clone()));
        }
        let mut ids = std::collections::HashSet::new();
        if let Some(dup) = routes.iter().find(|r| !ids.insert(r.id.as_str())) {
            return Err(RegistryError::DuplicateRoute(dup.id.clone()));
        }
        // Stable sort: among equally specific routes, the one listed first wins.
        routes.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        snapshot.routes = routes;
        snapshot.entries = entries;
        Ok(snapshot)
    }

    /// The entry for a caller: a managed identity's object id is the more specific match, so it wins.
    pub fn find_entry(
        &self,
        tenant: &TenantId,
        client_app_id: Option<&ClientAppId>,
        object_id: Option<&ObjectId>,
    ) -> Option<&AppEntry> {
        let by_object = object_id
            .and_then(|oid| self.by_object.get(&InTenant(tenant, oid)))
            .copied();
        let by_client = || {
            client_app_id
                .and_then(|app| self.by_client.get(&InTenant(tenant, app)))
                .copied()
        };
        by_object.or_else(by_client).map(|i| &self.entries[i])
    }

    pub fn application_user(&self, entry_name: &str) -> Option<&ApplicationUser> {
        self.app_users.get(entry_name)
    }

    pub fn role(&self, name: &str) -> Option<&SecurityRole> {
        self.roles.get(name)
    }

    pub fn user(&self, object_id: &ObjectId) -> Option<&User> {
        self.users.get(object_id)
    }

    pub fn has_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The most specific route for a request; the query string is not part of the match.
    pub fn route_for(&self, method: &str, path: &str) -> Option<&Route> {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        self.routes.iter().find(|r| r.matches(method, path))
    }

    /// Tenants of enabled entries: these are trusted in addition to the configured ones. Disabled
    /// entries still match (and deny with `APPLICATION_DISABLED`), so their tenants stay trusted too.
    pub fn entry_tenants(&self) -> BTreeSet<TenantId> {
        self.entries.iter().map(|e| e.tenant_id.clone()).collect()
    }

    pub fn entries(&self) -> &[AppEntry] {
        &self.entries
    }

    /// How many resources of each kind the snapshot holds, named as the store names the kinds.
    pub fn counts(&self) -> [(&'static str, usize); 5] {
        [
            ("app_entry", self.entries.len()),
            ("application_user", self.app_users.len()),
            ("security_role", self.roles.len()),
            ("user", self.users.len()),
            ("route", self.routes.len()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(name: &str, builtin: bool) -> SecurityRole {
        SecurityRole {
            name: name.into(),
            privileges: HashMap::from([("orders".into(), BTreeSet::from([Operation::Read]))]),
            act_on_behalf: false,
            builtin,
        }
    }

    fn entry(name: &str, app: &str) -> AppEntry {
        AppEntry {
            name: name.into(),
            tenant_id: TenantId::new("t"),
            client_app_id: Some(ClientAppId::new(app)),
            object_id: None,
            kind: AppEntryKind::ClientCredentials,
            required_role: None,
            enabled: true,
            source_principals: Vec::new(),
        }
    }

    fn app_user(entry: &str, role: &str) -> ApplicationUser {
        ApplicationUser {
            id: format!("{entry}-user"),
            name: entry.into(),
            entry_name: entry.into(),
            security_role: role.into(),
        }
    }

    fn route(method: Option<&str>, path: &str, resource: &str) -> Route {
        Route {
            id: path.to_owned(),
            method: method.map(str::to_owned),
            path: path.into(),
            resource: resource.into(),
            operation: Operation::Read,
        }
    }

    #[test]
    fn find_entry_matches_tenant_and_id_and_prefers_the_object_id() {
        let mut mi = entry("mi", "ignored");
        mi.kind = AppEntryKind::ManagedIdentity;
        mi.client_app_id = None;
        mi.object_id = Some(ObjectId::new("oid-1"));
        let snapshot = RegistrySnapshot::build(
            vec![entry("cc", "app-1"), mi],
            vec![app_user("cc", "r"), app_user("mi", "r")],
            vec![role("r", false)],
            vec![],
            vec![],
        )
        .unwrap();
        let (t, other) = (TenantId::new("t"), TenantId::new("other"));
        let (app, oid) = (ClientAppId::new("app-1"), ObjectId::new("oid-1"));
        let name = |e: Option<&AppEntry>| e.map(|e| e.name.clone());
        assert_eq!(
            name(snapshot.find_entry(&t, Some(&app), None)),
            Some("cc".into())
        );
        assert_eq!(
            name(snapshot.find_entry(&t, None, Some(&oid))),
            Some("mi".into())
        );
        assert_eq!(
            name(snapshot.find_entry(&t, Some(&app), Some(&oid))),
            Some("mi".into())
        );
        assert_eq!(
            name(snapshot.find_entry(&t, Some(&app), Some(&ObjectId::new("oid-2")))),
            Some("cc".into())
        );
        assert_eq!(
            name(snapshot.find_entry(&other, Some(&app), Some(&oid))),
            None
        );
        assert_eq!(
            name(snapshot.find_entry(&t, Some(&ClientAppId::new("app-2")), None)),
            None
        );
    }

    #[test]
    fn rejects_duplicates_and_builtin_roles() {
        let dup = RegistrySnapshot::build(
            vec![entry("a", "x"), entry("b", "x")],
            vec![app_user("a", "r"), app_user("b", "r")],
            vec![role("r", false)],
            vec![],
            vec![],
        );
        assert!(matches!(dup, Err(RegistryError::DuplicateIdentity { .. })));
        let builtin = RegistrySnapshot::build(
            vec![entry("a", "x")],
            vec![app_user("a", "System Administrator")],
            vec![role("System Administrator", true)],
            vec![],
            vec![],
        );
        assert!(matches!(builtin, Err(RegistryError::BuiltinRole { .. })));
        let missing_user =
            RegistrySnapshot::build(vec![entry("a", "x")], vec![], vec![], vec![], vec![]);
        assert!(matches!(
            missing_user,
            Err(RegistryError::ApplicationUserCount(_))
        ));
    }

    #[test]
    fn longest_route_wins_and_query_is_ignored() {
        let snapshot = RegistrySnapshot::build(
            vec![],
            vec![],
            vec![],
            vec![],
            vec![
                route(None, "/orders", "orders"),
                route(Some("GET"), "/orders/*/lines", "lines"),
                route(None, "/", "root"),
            ],
        )
        .unwrap();
        let found = |m, p| snapshot.route_for(m, p).map(|r| r.resource.clone());
        assert_eq!(
            found("GET", "/orders/7/lines?x=1").as_deref(),
            Some("lines")
        );
        assert_eq!(found("POST", "/orders/7/lines").as_deref(), Some("orders"));
        assert_eq!(found("GET", "/ordersX").as_deref(), Some("root"));
        assert_eq!(found("GET", "/orders").as_deref(), Some("orders"));
    }
}
