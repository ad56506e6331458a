//! `s2sauthz.v1.Registry` on the admin port: converts and validates protobuf resources, runs the change
//! on the registry (off the async runtime: SQLite commits block), and maps errors to gRPC codes.

use crate::core::ids::{ClientAppId, ObjectId, SpiffeId, TenantId, is_guid};
use crate::core::registry::{
    AppEntry, AppEntryKind, ApplicationUser, Operation, Route, SecurityRole, User,
};
use crate::fetch::check_url;
use crate::proto::s2sauthz::v1 as pb;
use crate::registry::{Record, Registry, RegistryOpError, Resource};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tonic::{Request, Response, Status};

const MAX_NAME: usize = 256;
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

pub struct RegistryApi {
    registry: Arc<Registry>,
}

impl RegistryApi {
    pub fn new(registry: Arc<Registry>) -> Self {
        RegistryApi { registry }
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<R, RegistryOpError> + Send + 'static,
    ) -> Result<R, Status> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || f(&registry))
            .await
            .map_err(|_| Status::internal("registry task failed"))?
            .map_err(status)
    }
}

fn status(e: RegistryOpError) -> Status {
    match e {
        RegistryOpError::NotFound(_) => Status::not_found(e.to_string()),
        RegistryOpError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        RegistryOpError::StaleEtag { .. } => Status::aborted(e.to_string()),
        RegistryOpError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        RegistryOpError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        RegistryOpError::Store(e) if e.is_unavailable() => {
            tracing::warn!(error = %e, "registry store unavailable");
            Status::unavailable("registry store unavailable; retry")
        }
        RegistryOpError::Store(e) => {
            tracing::error!(error = %e, "registry store failure");
            Status::internal("registry store failure")
        }
    }
}

fn invalid(field: &str, why: &str) -> Status {
    Status::invalid_argument(format!("`{field}` {why}"))
}

fn name(value: &str, field: &str) -> Result<String, Status> {
    let v = value.trim();
    if v.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if v.len() > MAX_NAME || v.chars().any(char::is_control) {
        return Err(invalid(field, "must be at most 256 printable characters"));
    }
    Ok(v.to_owned())
}

fn guid(value: &str, field: &str) -> Result<String, Status> {
    let v = value.trim();
    if is_guid(v) {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(invalid(field, "must be a GUID (8-4-4-4-12 hex digits)"))
    }
}

fn optional(value: &str) -> Option<&str> {
    Some(value.trim()).filter(|v| !v.is_empty())
}

fn operation(op: i32, field: &str) -> Result<Operation, Status> {
    match pb::Operation::try_from(op) {
        Ok(pb::Operation::Read) => Ok(Operation::Read),
        Ok(pb::Operation::Create) => Ok(Operation::Create),
        Ok(pb::Operation::Write) => Ok(Operation::Write),
        Ok(pb::Operation::Delete) => Ok(Operation::Delete),
        _ => Err(invalid(field, "must be READ, CREATE, WRITE or DELETE")),
    }
}

fn operation_pb(op: Operation) -> i32 {
    let op = match op {
        Operation::Read => pb::Operation::Read,
        Operation::Create => pb::Operation::Create,
        Operation::Write => pb::Operation::Write,
        Operation::Delete => pb::Operation::Delete,
    };
    op as i32
}

fn app_entry(e: pb::AppEntry) -> Result<AppEntry, Status> {
    let name = name(&e.name, "name")?;
    // Entra tenants are GUIDs; a generic OIDC issuer's URL plays the tenant's part.
    let tenant = e.tenant_id.trim();
    let entra = is_guid(tenant);
    if !entra && check_url(tenant).is_err() {
        return Err(invalid(
            "tenant_id",
            "must be a tenant GUID or a configured OIDC issuer URL",
        ));
    }
    let id = |value: &str, field: &str| -> Result<Option<String>, Status> {
        match optional(value) {
            None => Ok(None),
            Some(v) if entra => guid(v, field).map(Some),
            Some(v) => self::name(v, field).map(Some),
        }
    };
    let client_app_id = id(&e.client_app_id, "client_app_id")?;
    let object_id = id(&e.object_id, "object_id")?;
    let kind = match pb::AppEntryKind::try_from(e.kind) {
        Ok(pb::AppEntryKind::ClientCredentials) => AppEntryKind::ClientCredentials,
        Ok(pb::AppEntryKind::ManagedIdentity) => AppEntryKind::ManagedIdentity,
        _ => {
            return Err(invalid(
                "kind",
                "must be CLIENT_CREDENTIALS or MANAGED_IDENTITY",
            ));
        }
    };
    match kind {
        AppEntryKind::ClientCredentials if client_app_id.is_none() => {
            return Err(invalid(
                "client_app_id",
                "is required for CLIENT_CREDENTIALS entries",
            ));
        }
        AppEntryKind::ManagedIdentity if object_id.is_none() => {
            return Err(invalid(
                "object_id",
                "is required for MANAGED_IDENTITY entries",
            ));
        }
        _ => {}
    }
    let required_role = optional(&e.required_role)
        .map(|r| self::name(r, "required_role"))
        .transpose()?;
    let source_principals = source_principals(&e.source_principals)?;
    Ok(AppEntry {
        name,
        tenant_id: TenantId::new(tenant),
        client_app_id: client_app_id.as_deref().map(ClientAppId::new),
        object_id: object_id.as_deref().map(ObjectId::new),
        kind,
        required_role,
        enabled: e.enabled,
        source_principals,
    })
}

/// At most this many source principals per entry: a list, not a trust bundle.
const MAX_SOURCE_PRINCIPALS: usize = 100;

/// SPIFFE ids, each validated, duplicates dropped (the first occurrence keeps its place).
fn source_principals(values: &[String]) -> Result<Vec<SpiffeId>, Status> {
    if values.len() > MAX_SOURCE_PRINCIPALS {
        return Err(invalid(
            "source_principals",
            "may list at most 100 SPIFFE ids",
        ));
    }
    let mut out: Vec<SpiffeId> = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let id = SpiffeId::parse(value)
            .map_err(|e| invalid(&format!("source_principals[{i}]"), &e.to_string()))?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

fn kind_pb(kind: AppEntryKind) -> i32 {
    let kind = match kind {
        AppEntryKind::ClientCredentials => pb::AppEntryKind::ClientCredentials,
        AppEntryKind::ManagedIdentity => pb::AppEntryKind::ManagedIdentity,
    };
    kind as i32
}

fn app_entry_pb(r: Record<AppEntry>) -> pb::AppEntry {
    let e = r.value;
    pb::AppEntry {
        name: e.name,
        client_app_id: e.client_app_id.map(String::from).unwrap_or_default(),
        tenant_id: e.tenant_id.into(),
        object_id: e.object_id.map(String::from).unwrap_or_default(),
        kind: kind_pb(e.kind),
        required_role: e.required_role.unwrap_or_default(),
        enabled: e.enabled,
        etag: r.etag,
        provisioned: r.provisioned,
        source_principals: e.source_principals.into_iter().map(String::from).collect(),
    }
}

fn application_user(u: pb::ApplicationUser) -> Result<ApplicationUser, Status> {
    Ok(ApplicationUser {
        id: name(&u.id, "id")?,
        name: name(&u.name, "name")?,
        entry_name: name(&u.app_entry, "app_entry")?,
        security_role: name(&u.security_role, "security_role")?,
    })
}

fn application_user_pb(r: Record<ApplicationUser>) -> pb::ApplicationUser {
    pb::ApplicationUser {
        id: r.value.id,
        name: r.value.name,
        app_entry: r.value.entry_name,
        security_role: r.value.security_role,
        etag: r.etag,
        provisioned: r.provisioned,
    }
}

fn security_role(r: pb::SecurityRole) -> Result<SecurityRole, Status> {
    let mut privileges: HashMap<String, BTreeSet<Operation>> = HashMap::new();
    for (i, p) in r.privileges.iter().enumerate() {
        let resource = name(&p.resource, &format!("privileges[{i}].resource"))?;
        let ops = p
            .operations
            .iter()
            .map(|op| operation(*op, &format!("privileges[{i}].operations")))
            .collect::<Result<BTreeSet<_>, _>>()?;
        privileges.entry(resource).or_default().extend(ops);
    }
    Ok(SecurityRole {
        name: name(&r.name, "name")?,
        privileges,
        act_on_behalf: r.act_on_behalf,
        builtin: r.builtin,
    })
}

fn security_role_pb(r: Record<SecurityRole>) -> pb::SecurityRole {
    let mut privileges: Vec<pb::Privilege> = r
        .value
        .privileges
        .into_iter()
        .map(|(resource, ops)| pb::Privilege {
            resource,
            operations: ops.into_iter().map(operation_pb).collect(),
        })
        .collect();
    privileges.sort_by(|a, b| a.resource.cmp(&b.resource));
    pb::SecurityRole {
        name: r.value.name,
        privileges,
        act_on_behalf: r.value.act_on_behalf,
        builtin: r.value.builtin,
        etag: r.etag,
        provisioned: r.provisioned,
    }
}

fn user(u: pb::User) -> Result<User, Status> {
    Ok(User {
        object_id: ObjectId::new(&guid(&u.object_id, "object_id")?),
        name: name(&u.name, "name")?,
        security_role: name(&u.security_role, "security_role")?,
    })
}

fn user_pb(r: Record<User>) -> pb::User {
    pb::User {
        object_id: r.value.object_id.into(),
        name: r.value.name,
        security_role: r.value.security_role,
        etag: r.etag,
        provisioned: r.provisioned,
    }
}

fn route(r: pb::Route) -> Result<Route, Status> {
    let path = r.path.trim();
    if !path.starts_with('/') || path.len() > 2048 {
        return Err(invalid(
            "path",
            "must start with `/` and be at most 2048 characters",
        ));
    }
    let method = optional(&r.method).map(str::to_ascii_uppercase);
    if method
        .as_deref()
        .is_some_and(|m| !m.bytes().all(|b| b.is_ascii_uppercase()) || m.len() > 16)
    {
        return Err(invalid(
            "method",
            "must be an HTTP method such as GET, or empty for any",
        ));
    }
    let id = match optional(&r.id) {
        Some(id) => name(id, "id")?,
        None => uuid::Uuid::new_v4().to_string(),
    };
    Ok(Route {
        id,
        method,
        path: path.to_owned(),
        resource: name(&r.resource, "resource")?,
        operation: operation(r.operation, "operation")?,
    })
}

fn route_pb(r: Record<Route>) -> pb::Route {
    pb::Route {
        id: r.value.id,
        method: r.value.method.unwrap_or_default(),
        path: r.value.path,
        resource: r.value.resource,
        operation: operation_pb(r.value.operation),
        etag: r.etag,
        provisioned: r.provisioned,
    }
}

/// One page of `items`; the token is the offset of the next page.
fn page<T>(items: Vec<T>, request: &pb::ListRequest) -> Result<(Vec<T>, String), Status> {
    let size = match usize::try_from(request.page_size) {
        Ok(0) => DEFAULT_PAGE,
        Ok(n) => n.min(MAX_PAGE),
        Err(_) => return Err(invalid("page_size", "must not be negative")),
    };
    let start = match optional(&request.page_token) {
        None => 0,
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| invalid("page_token", "is not a token this service issued"))?,
    };
    let total = items.len();
    let items: Vec<T> = items.into_iter().skip(start).take(size).collect();
    let next = if start + items.len() < total {
        (start + items.len()).to_string()
    } else {
        String::new()
    };
    Ok((items, next))
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| invalid(field, "is required"))
}

impl RegistryApi {
    async fn get_one<T: Resource, P>(
        &self,
        key: String,
        to: fn(Record<T>) -> P,
    ) -> Result<Response<P>, Status> {
        let record = self.run(move |r| r.get::<T>(&key)).await?;
        Ok(Response::new(to(record)))
    }

    async fn list_all<T: Resource, P>(
        &self,
        request: pb::ListRequest,
        to: fn(Record<T>) -> P,
    ) -> Result<(Vec<P>, String), Status> {
        let all = self.run(|r| r.list::<T>()).await?;
        let (items, next) = page(all, &request)?;
        Ok((items.into_iter().map(to).collect(), next))
    }

    async fn create_one<T: Resource, P>(
        &self,
        value: T,
        to: fn(Record<T>) -> P,
    ) -> Result<Response<P>, Status> {
        let record = self.run(move |r| r.create(value)).await?;
        Ok(Response::new(to(record)))
    }

    async fn update_one<T: Resource, P>(
        &self,
        value: T,
        etag: String,
        to: fn(Record<T>) -> P,
    ) -> Result<Response<P>, Status> {
        let record = self.run(move |r| r.update(value, &etag)).await?;
        Ok(Response::new(to(record)))
    }

    async fn delete_one<T: Resource>(
        &self,
        request: pb::DeleteRequest,
    ) -> Result<Response<()>, Status> {
        self.run(move |r| r.delete::<T>(&request.key, &request.etag))
            .await?;
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryApi {
    async fn create_app_entry(
        &self,
        request: Request<pb::CreateAppEntryRequest>,
    ) -> Result<Response<pb::AppEntry>, Status> {
        let request = request.into_inner();
        let entry = app_entry(required(request.entry, "entry")?)?;
        // The application user is created with the entry, named after it unless a name is given.
        let user = ApplicationUser {
            id: uuid::Uuid::new_v4().to_string(),
            name: match optional(&request.application_user_name) {
                Some(n) => name(n, "application_user_name")?,
                None => entry.name.clone(),
            },
            entry_name: entry.name.clone(),
            security_role: name(&request.security_role, "security_role")?,
        };
        let record = self.run(move |r| r.create_entry(entry, user)).await?;
        Ok(Response::new(app_entry_pb(record)))
    }

    async fn get_app_entry(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::AppEntry>, Status> {
        self.get_one::<AppEntry, _>(request.into_inner().key, app_entry_pb)
            .await
    }

    async fn list_app_entries(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListAppEntriesResponse>, Status> {
        let (app_entries, next_page_token) = self
            .list_all::<AppEntry, _>(request.into_inner(), app_entry_pb)
            .await?;
        Ok(Response::new(pb::ListAppEntriesResponse {
            app_entries,
            next_page_token,
        }))
    }

    async fn update_app_entry(
        &self,
        request: Request<pb::UpdateAppEntryRequest>,
    ) -> Result<Response<pb::AppEntry>, Status> {
        let message = required(request.into_inner().entry, "entry")?;
        let etag = message.etag.clone();
        self.update_one(app_entry(message)?, etag, app_entry_pb)
            .await
    }

    async fn delete_app_entry(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<()>, Status> {
        self.delete_one::<AppEntry>(request.into_inner()).await
    }

    async fn create_application_user(
        &self,
        request: Request<pb::CreateApplicationUserRequest>,
    ) -> Result<Response<pb::ApplicationUser>, Status> {
        let mut message = required(request.into_inner().application_user, "application_user")?;
        if message.id.trim().is_empty() {
            message.id = uuid::Uuid::new_v4().to_string();
        }
        let user = application_user(message)?;
        let entry = user.entry_name.clone();
        // Exactly one application user per entry: the entry's own was created with it.
        let existing = self.run(|r| r.list::<ApplicationUser>()).await?;
        if existing.iter().any(|u| u.value.entry_name == entry) {
            return Err(Status::already_exists(format!(
                "app entry `{entry}` already has its application user"
            )));
        }
        self.create_one(user, application_user_pb).await
    }

    async fn get_application_user(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::ApplicationUser>, Status> {
        self.get_one::<ApplicationUser, _>(request.into_inner().key, application_user_pb)
            .await
    }

    async fn list_application_users(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListApplicationUsersResponse>, Status> {
        let (application_users, next_page_token) = self
            .list_all::<ApplicationUser, _>(request.into_inner(), application_user_pb)
            .await?;
        Ok(Response::new(pb::ListApplicationUsersResponse {
            application_users,
            next_page_token,
        }))
    }

    async fn update_application_user(
        &self,
        request: Request<pb::UpdateApplicationUserRequest>,
    ) -> Result<Response<pb::ApplicationUser>, Status> {
        let message = required(request.into_inner().application_user, "application_user")?;
        let etag = message.etag.clone();
        let user = application_user(message)?;
        let id = user.id.clone();
        let current = self.run(move |r| r.get::<ApplicationUser>(&id)).await?;
        if current.value.entry_name != user.entry_name {
            return Err(invalid(
                "app_entry",
                "cannot change: an application user belongs to its entry for life",
            ));
        }
        self.update_one(user, etag, application_user_pb).await
    }

    async fn delete_application_user(
        &self,
        _request: Request<pb::DeleteRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::failed_precondition(
            "an application user is deleted with its app entry; delete the entry instead",
        ))
    }

    async fn create_security_role(
        &self,
        request: Request<pb::CreateSecurityRoleRequest>,
    ) -> Result<Response<pb::SecurityRole>, Status> {
        let role = security_role(required(
            request.into_inner().security_role,
            "security_role",
        )?)?;
        self.create_one(role, security_role_pb).await
    }

    async fn get_security_role(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::SecurityRole>, Status> {
        self.get_one::<SecurityRole, _>(request.into_inner().key, security_role_pb)
            .await
    }

    async fn list_security_roles(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListSecurityRolesResponse>, Status> {
        let (security_roles, next_page_token) = self
            .list_all::<SecurityRole, _>(request.into_inner(), security_role_pb)
            .await?;
        Ok(Response::new(pb::ListSecurityRolesResponse {
            security_roles,
            next_page_token,
        }))
    }

    async fn update_security_role(
        &self,
        request: Request<pb::UpdateSecurityRoleRequest>,
    ) -> Result<Response<pb::SecurityRole>, Status> {
        let message = required(request.into_inner().security_role, "security_role")?;
        let etag = message.etag.clone();
        self.update_one(security_role(message)?, etag, security_role_pb)
            .await
    }

    async fn delete_security_role(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<()>, Status> {
        self.delete_one::<SecurityRole>(request.into_inner()).await
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let value = user(required(request.into_inner().user, "user")?)?;
        self.create_one(value, user_pb).await
    }

    async fn get_user(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let key = ObjectId::new(&request.into_inner().key).to_string();
        self.get_one::<User, _>(key, user_pb).await
    }

    async fn list_users(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let (users, next_page_token) = self
            .list_all::<User, _>(request.into_inner(), user_pb)
            .await?;
        Ok(Response::new(pb::ListUsersResponse {
            users,
            next_page_token,
        }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let message = required(request.into_inner().user, "user")?;
        let etag = message.etag.clone();
        self.update_one(user(message)?, etag, user_pb).await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<()>, Status> {
        let mut request = request.into_inner();
        request.key = ObjectId::new(&request.key).to_string();
        self.delete_one::<User>(request).await
    }

    async fn create_route(
        &self,
        request: Request<pb::CreateRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        let value = route(required(request.into_inner().route, "route")?)?;
        self.create_one(value, route_pb).await
    }

    async fn get_route(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        self.get_one::<Route, _>(request.into_inner().key, route_pb)
            .await
    }

    async fn list_routes(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let (routes, next_page_token) = self
            .list_all::<Route, _>(request.into_inner(), route_pb)
            .await?;
        Ok(Response::new(pb::ListRoutesResponse {
            routes,
            next_page_token,
        }))
    }

    async fn update_route(
        &self,
        request: Request<pb::UpdateRouteRequest>,
    ) -> Result<Response<pb::Route>, Status> {
        let message = required(request.into_inner().route, "route")?;
        if message.id.trim().is_empty() {
            return Err(invalid("id", "is required to update a route"));
        }
        let etag = message.etag.clone();
        self.update_one(route(message)?, etag, route_pb).await
    }

    async fn delete_route(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<()>, Status> {
        self.delete_one::<Route>(request.into_inner()).await
    }
}
