//! Team: a RoleBinding in the namespace of each of the team's projects, binding the team's
//! group (`shapeblock:team:<name>`) and each member (`shapeblock:user:<id>`) to the
//! ClusterRole of the team's role there (`shapeblock-team-<role>`, shipped with the agent's
//! install manifest). A project that does not exist yet, or is not Active, is reported in
//! status (`missingProjects`) and bound as soon as it is: the Project watch brings the Team
//! back. A project dropped from the spec loses its binding at once; deleting the Team removes
//! every binding first (finalizer); deleting a Project removes its namespace, and the binding
//! with it.
//!
//! Every binding carries the label [`TEAM_LABEL`], by which the controller watches them all
//! (and is brought back when one is changed or deleted by hand). It reads Projects and its
//! bindings from those watches' stores, not from the apiserver at each reconcile.
//!
//! The hub also keeps each cluster's membership in a [`Directory`], from which the kubectl
//! proxy names the groups of the user it acts for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};

use super::{Context, MANAGED_BY, ReconcileError};
use crate::crd::{FIELD_MANAGER, Project, ProjectPhase, Team, TeamRole};
use crate::render::agent::{
    IMPERSONATED_GROUP_PREFIX, IMPERSONATED_USER_PREFIX, IMPERSONATOR_ROLE, PROJECT_LABEL,
    impersonator_rules, team_role_name,
};

/// Finalizer that makes a Team's deletion remove its RoleBindings first.
pub const FINALIZER: &str = "apps.shapeblock.io/team-bindings";
/// Label on every RoleBinding of a Team (its value: the Team's name).
pub const TEAM_LABEL: &str = "shapeblock.io/team";
/// The type of a Team's condition: every project of its spec is bound.
pub const READY: &str = "Ready";
/// Reason of a Team whose projects are all bound.
pub const BOUND: &str = "Bound";
/// Reason of a Team with projects that do not exist or are not Active yet.
pub const PROJECTS_MISSING: &str = "ProjectsMissing";

/// The user the apiserver sees for a ShapeBlock user id (the agent impersonates it).
pub fn user_name(id: &str) -> String {
    format!("{IMPERSONATED_USER_PREFIX}{id}")
}

/// The group of a Team (the agent impersonates it for the team's members).
pub fn group_name(team: &str) -> String {
    format!("{IMPERSONATED_GROUP_PREFIX}{team}")
}

/// Name of a Team's RoleBinding in each of its project namespaces.
pub fn binding_name(team: &str) -> String {
    format!("shapeblock-team-{team}")
}

/// The RoleBinding of `team` in `project`'s namespace, for `role` (pure).
pub fn binding(team: &Team, project: &str, role: TeamRole) -> Value {
    let name = team.name_any();
    let mut subjects = vec![json!({
        "kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": group_name(&name)
    })];
    subjects.extend(team.spec.members.iter().map(|id| {
        json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": user_name(id)})
    }));
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {
            "name": binding_name(&name), "namespace": project,
            "labels": {TEAM_LABEL: name, PROJECT_LABEL: project, MANAGED_BY.0: MANAGED_BY.1},
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": team_role_name(role)},
        "subjects": subjects,
    })
}

/// What the cluster holds for one Team.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Projects that are Active (their namespace is ready), by name.
    pub active_projects: BTreeSet<String>,
    /// Namespaces holding a RoleBinding labelled with this Team.
    pub bound_namespaces: BTreeSet<String>,
}

/// What to do for a Team (pure).
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Add the finalizer before binding anything.
    AddFinalizer,
    /// Apply these bindings (project, role), delete those in these namespaces, then report.
    Sync {
        apply: Vec<(String, TeamRole)>,
        delete: Vec<String>,
        missing: Vec<String>,
    },
    /// The Team is being deleted: delete every binding, then let it go.
    Release { delete: Vec<String> },
}

/// Decides what a Team needs (pure).
pub fn decide(team: &Team, o: &Observed) -> Plan {
    let has_finalizer = team.finalizers().iter().any(|f| f == FINALIZER);
    if team.metadata.deletion_timestamp.is_some() {
        return Plan::Release {
            delete: o.bound_namespaces.iter().cloned().collect(),
        };
    }
    if !has_finalizer {
        return Plan::AddFinalizer;
    }
    let (apply, missing): (Vec<_>, Vec<_>) = team
        .spec
        .projects
        .iter()
        .map(|p| (p.project.clone(), p.role))
        .partition(|(project, _)| o.active_projects.contains(project));
    let wanted: BTreeSet<&String> = apply.iter().map(|(p, _)| p).collect();
    let delete = o
        .bound_namespaces
        .iter()
        .filter(|ns| !wanted.contains(ns))
        .cloned()
        .collect();
    Plan::Sync {
        apply,
        delete,
        missing: missing.into_iter().map(|(p, _)| p).collect(),
    }
}

/// The members of each Team of one cluster, from the Team controller's watch: which team
/// groups a user is in (for the kubectl proxy), and whom the agent may impersonate (kept in
/// the ClusterRole `shapeblock-agent-impersonator`).
#[derive(Debug, Default)]
pub struct Directory {
    state: std::sync::Mutex<DirectoryState>,
    /// Signalled on every change (a permit is kept when no one waits, so none is missed).
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct DirectoryState {
    /// Members by Team.
    teams: BTreeMap<String, BTreeSet<String>>,
    /// The Teams of a re-list in progress, which replace `teams` when it is done (so a Team
    /// deleted while the watch was down goes too).
    relist: Option<BTreeMap<String, BTreeSet<String>>>,
    /// A first list has completed.
    ready: bool,
}

impl Directory {
    fn state(&self) -> std::sync::MutexGuard<'_, DirectoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The groups (`shapeblock:team:<name>`) of the Teams that have `user` as a member,
    /// sorted; None until the first list is complete.
    pub fn groups_of(&self, user: &str) -> Option<Vec<String>> {
        let state = self.state();
        state.ready.then(|| {
            state
                .teams
                .iter()
                .filter(|(_, members)| members.contains(user))
                .map(|(team, _)| group_name(team))
                .collect()
        })
    }

    /// Whom the agent may impersonate: every member's user and every Team's group, sorted;
    /// None until the first list is complete.
    pub fn impersonated(&self) -> Option<(Vec<String>, Vec<String>)> {
        let state = self.state();
        if !state.ready {
            return None;
        }
        let users: BTreeSet<String> = state
            .teams
            .values()
            .flatten()
            .map(|id| user_name(id))
            .collect();
        let groups = state.teams.keys().map(|team| group_name(team)).collect();
        Some((users.into_iter().collect(), groups))
    }

    /// Follows one event of the Team watch.
    fn observe(&self, event: &watcher::Event<Team>) {
        let members = |team: &Team| team.spec.members.iter().cloned().collect::<BTreeSet<_>>();
        {
            let mut state = self.state();
            match event {
                watcher::Event::Init => state.relist = Some(BTreeMap::new()),
                watcher::Event::InitApply(team) => {
                    if let Some(relist) = state.relist.as_mut() {
                        relist.insert(team.name_any(), members(team));
                    }
                }
                watcher::Event::InitDone => {
                    if let Some(relist) = state.relist.take() {
                        state.teams = relist;
                    }
                    state.ready = true;
                }
                watcher::Event::Apply(team) => {
                    state.teams.insert(team.name_any(), members(team));
                }
                watcher::Event::Delete(team) => {
                    state.teams.remove(&team.name_any());
                }
            }
        }
        self.changed.notify_one();
    }
}

/// Keeps the agent's impersonation (`shapeblock-agent-impersonator`) to exactly the people the
/// cluster's Teams name, applying it whenever that changes; retried with backoff when the
/// apiserver refuses (an agent installed from an older manifest has no such role).
async fn keep_impersonation(ctx: Arc<Context>, directory: Arc<Directory>) {
    let roles: Api<ClusterRole> = Api::all(ctx.client.clone());
    let mut applied = None;
    let mut retry = Duration::from_secs(1);
    loop {
        directory.changed.notified().await;
        // A burst of changes (the first list) is applied once.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(wanted) = directory.impersonated() else {
            continue;
        };
        if applied.as_ref() == Some(&wanted) {
            continue;
        }
        let role = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": IMPERSONATOR_ROLE},
            "rules": impersonator_rules(&wanted.0, &wanted.1),
        });
        match roles
            .patch(IMPERSONATOR_ROLE, &apply_params(), &Patch::Apply(&role))
            .await
        {
            Ok(_) => {
                tracing::debug!(
                    users = wanted.0.len(),
                    groups = wanted.1.len(),
                    "impersonation updated"
                );
                applied = Some(wanted);
                retry = Duration::from_secs(1);
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?retry,
                    "could not set whom the agent may impersonate for kubectl (ClusterRole {IMPERSONATOR_ROLE}); \
                     if this lasts, apply the agent's install manifest again");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(300));
                directory.changed.notify_one();
            }
        }
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// What the controller reads from its own watches instead of asking the apiserver at each
/// reconcile (through the tunnel, one GET per project of the Team and a LIST of bindings):
/// every Project with its phase, and every RoleBinding it labelled.
#[derive(Clone)]
struct Stores {
    projects: reflector::Store<Project>,
    bindings: reflector::Store<PartialObjectMeta<RoleBinding>>,
}

impl Stores {
    /// Whether both watches have listed everything once. Before that a Project not yet seen
    /// would look missing, and its binding be revoked.
    fn ready(&self) -> bool {
        let ready = |waiting: Option<Result<(), reflector::store::WriterDropped>>| {
            matches!(waiting, Some(Ok(())))
        };
        ready(self.projects.wait_until_ready().now_or_never())
            && ready(self.bindings.wait_until_ready().now_or_never())
    }
}

fn read(team: &Team, stores: &Stores) -> Observed {
    let active_projects = team
        .spec
        .projects
        .iter()
        .filter(|p| {
            stores
                .projects
                .get(&ObjectRef::new(&p.project))
                .is_some_and(|project| {
                    project.metadata.deletion_timestamp.is_none()
                        && project.status.as_ref().and_then(|s| s.phase)
                            == Some(ProjectPhase::Active)
                })
        })
        .map(|p| p.project.clone())
        .collect();
    let name = team.name_any();
    let binding = binding_name(&name);
    let bound_namespaces = stores
        .bindings
        .state()
        .iter()
        .filter(|b| b.labels().get(TEAM_LABEL) == Some(&name) && b.name_any() == binding)
        .filter_map(|b| b.namespace())
        .collect();
    Observed {
        active_projects,
        bound_namespaces,
    }
}

async fn delete_bindings(
    team: &str,
    namespaces: &[String],
    ctx: &Context,
) -> Result<(), ReconcileError> {
    for namespace in namespaces {
        let api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), namespace);
        match api
            .delete(&binding_name(team), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn reconcile(
    team: Arc<Team>,
    ctx: Arc<Context>,
    stores: Stores,
) -> Result<Action, ReconcileError> {
    if !stores.ready() {
        // The initial lists bring every Team naming a Project back once they are in.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let observed = read(&team, &stores);
    let teams: Api<Team> = Api::all(ctx.client.clone());
    let name = team.name_any();
    match decide(&team, &observed) {
        Plan::AddFinalizer => super::jobs::add_finalizer(&teams, &team, FINALIZER).await?,
        Plan::Release { delete } => {
            delete_bindings(&name, &delete, &ctx).await?;
            if team.finalizers().iter().any(|f| f == FINALIZER) {
                super::jobs::remove_finalizer(&teams, &team, FINALIZER).await?;
            }
        }
        Plan::Sync {
            apply,
            delete,
            missing,
        } => {
            // Revocations first: access goes before any is granted.
            delete_bindings(&name, &delete, &ctx).await?;
            for (project, role) in &apply {
                let api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), project);
                api.patch(
                    &binding_name(&name),
                    &apply_params(),
                    &Patch::Apply(&binding(&team, project, *role)),
                )
                .await?;
            }
            let bound: Vec<String> = apply.into_iter().map(|(p, _)| p).collect();
            write_status(&teams, &team, &bound, &missing).await?;
        }
    }
    Ok(Action::await_change())
}

async fn write_status(
    api: &Api<Team>,
    team: &Team,
    bound: &[String],
    missing: &[String],
) -> Result<(), kube::Error> {
    let current = team.status.clone().unwrap_or_default();
    let now = Time(jiff::Timestamp::now());
    let mut conditions = current.conditions.clone();
    let (reason, message) = if missing.is_empty() {
        (
            BOUND,
            format!("bound in {} project namespace(s)", bound.len()),
        )
    } else {
        (
            PROJECTS_MISSING,
            format!(
                "no Active Project {}: bound as soon as it exists",
                missing.join(", ")
            ),
        )
    };
    super::set_condition(
        &mut conditions,
        READY,
        missing.is_empty(),
        reason,
        &message,
        team.metadata.generation,
        &now,
    );
    let members = team.spec.members.len() as i64;
    if current.bound_projects == bound
        && current.missing_projects == missing
        && current.member_count == members
        && current.observed_generation == team.metadata.generation
        && current.conditions == conditions
    {
        return Ok(());
    }
    let status = json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Team",
        "status": {
            "boundProjects": bound, "missingProjects": missing, "memberCount": members,
            "observedGeneration": team.metadata.generation, "lastUpdated": now,
            "conditions": conditions,
        }
    });
    api.patch_status(&team.name_any(), &apply_params(), &Patch::Apply(&status))
        .await?;
    Ok(())
}

/// Runs the Team controller (its Projects from the cluster's shared watch); stop it by
/// dropping the future.
pub async fn run(ctx: Arc<Context>, directory: Arc<Directory>, watches: &super::shared::Watches) {
    let client = ctx.client.clone();
    let ctx_for_impersonation = ctx.clone();
    let metrics = ctx.metrics.clone();
    let (store, writer) = reflector::store::<Team>();
    let teams = watcher(Api::<Team>::all(client.clone()), super::watch_config())
        .modify(|team| team.managed_fields_mut().clear())
        .map({
            let directory = directory.clone();
            move |event| {
                if let Ok(event) = &event {
                    directory.observe(event);
                }
                event
            }
        });
    let teams = reflector(writer, teams).applied_objects();
    let (bindings, bindings_writer) = reflector::store::<PartialObjectMeta<RoleBinding>>();
    let stores = Stores {
        projects: watches.projects.store(),
        bindings,
    };
    let binding_events = watcher(
        Api::<PartialObjectMeta<RoleBinding>>::all(client),
        super::watch_config().labels(TEAM_LABEL),
    );
    let team_store = store.clone();
    let controller = Controller::for_stream(teams, store)
        .with_config(super::controller_config())
        // A Project that appears, becomes Active or goes brings back the Teams naming it.
        .watches_shared_stream(watches.projects.touched(), move |project: Arc<Project>| {
            let name = project.name_any();
            team_store
                .state()
                .iter()
                .filter(|t| t.spec.projects.iter().any(|p| p.project == name))
                .map(|t| ObjectRef::from_obj(t.as_ref()))
                .collect::<Vec<_>>()
        })
        // A binding changed or deleted by hand brings its Team back.
        .watches_stream(
            reflector(bindings_writer, binding_events).touched_objects(),
            |binding| {
                binding
                    .labels()
                    .get(TEAM_LABEL)
                    .map(|team| ObjectRef::<Team>::new(team))
            },
        )
        .run(
            super::bounded("team", move |team, ctx| {
                reconcile(team, ctx, stores.clone())
            }),
            |object, error, ctx| super::on_error("team", object, error, ctx),
            ctx,
        )
        .for_each(|result| {
            metrics.record("team", &result);
            async {}
        });
    tokio::select! {
        _ = controller => {}
        _ = keep_impersonation(ctx_for_impersonation, directory) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn team(finalizer: bool, deleting: bool) -> Team {
        let mut team: Team = serde_json::from_value(json!({
            "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Team",
            "metadata": {"name": "web", "generation": 1},
            "spec": {"members": ["alice", "bob@example.com"],
                     "projects": [{"project": "shop", "role": "developer"},
                                  {"project": "blog", "role": "viewer"}]}
        }))
        .unwrap();
        if finalizer {
            team.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        if deleting {
            team.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        }
        team
    }

    fn observed(active: &[&str], bound: &[&str]) -> Observed {
        Observed {
            active_projects: active.iter().map(|s| s.to_string()).collect(),
            bound_namespaces: bound.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_team_gets_its_finalizer_before_any_binding() {
        assert_eq!(
            decide(&team(false, false), &observed(&["shop"], &[])),
            Plan::AddFinalizer
        );
    }

    #[test]
    fn existing_projects_are_bound_missing_ones_reported_and_dropped_ones_unbound() {
        let plan = decide(
            &team(true, false),
            &observed(&["shop", "other"], &["shop", "old"]),
        );
        assert_eq!(
            plan,
            Plan::Sync {
                apply: vec![("shop".into(), TeamRole::Developer)],
                delete: vec!["old".into()],
                missing: vec!["blog".into()],
            }
        );
    }

    #[test]
    fn deletion_removes_every_binding() {
        let plan = decide(&team(true, true), &observed(&["shop"], &["shop", "blog"]));
        assert_eq!(
            plan,
            Plan::Release {
                delete: vec!["blog".into(), "shop".into()]
            }
        );
    }

    #[test]
    fn the_binding_names_the_team_group_and_each_member_under_the_shapeblock_prefixes() {
        let b = binding(&team(true, false), "shop", TeamRole::Developer);
        assert_eq!(b["metadata"]["namespace"], "shop");
        assert_eq!(b["metadata"]["name"], "shapeblock-team-web");
        assert_eq!(b["metadata"]["labels"][TEAM_LABEL], "web");
        assert_eq!(b["roleRef"]["name"], "shapeblock-team-developer");
        let subjects: Vec<(&str, &str)> = b["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["kind"].as_str().unwrap(), s["name"].as_str().unwrap()))
            .collect();
        assert_eq!(
            subjects,
            [
                ("Group", "shapeblock:team:web"),
                ("User", "shapeblock:user:alice"),
                ("User", "shapeblock:user:bob@example.com")
            ]
        );
    }

    #[test]
    fn the_directory_knows_each_users_team_groups_and_whom_to_impersonate() {
        let directory = Directory::default();
        let web = team(true, false);
        let mut ops = team(true, false);
        ops.metadata.name = Some("ops".into());
        ops.spec.members = vec!["alice".into()];
        let mut gone = team(true, false);
        gone.metadata.name = Some("gone".into());
        directory.observe(&watcher::Event::Apply(gone.clone()));
        assert_eq!(
            directory.impersonated(),
            None,
            "nothing before the first list"
        );
        assert_eq!(directory.groups_of("alice"), None);
        // A re-list replaces what was known: a Team deleted meanwhile goes.
        directory.observe(&watcher::Event::Init);
        directory.observe(&watcher::Event::InitApply(web.clone()));
        directory.observe(&watcher::Event::InitApply(ops.clone()));
        directory.observe(&watcher::Event::InitDone);
        assert_eq!(
            directory.groups_of("alice").unwrap(),
            ["shapeblock:team:ops", "shapeblock:team:web"]
        );
        assert_eq!(
            directory.groups_of("bob@example.com").unwrap(),
            ["shapeblock:team:web"]
        );
        assert!(directory.groups_of("mallory").unwrap().is_empty());
        assert_eq!(
            directory.impersonated(),
            Some((
                vec![
                    "shapeblock:user:alice".into(),
                    "shapeblock:user:bob@example.com".into()
                ],
                vec!["shapeblock:team:ops".into(), "shapeblock:team:web".into()]
            ))
        );
        directory.observe(&watcher::Event::Delete(web));
        assert_eq!(
            directory.groups_of("alice").unwrap(),
            ["shapeblock:team:ops"]
        );
        assert_eq!(
            directory.impersonated(),
            Some((
                vec!["shapeblock:user:alice".into()],
                vec!["shapeblock:team:ops".into()]
            ))
        );
    }
}
