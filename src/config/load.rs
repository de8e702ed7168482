//! The TOML loader: raw serde structs → validated [`Config`], with every error and its line.
//!
//! Each section (`[server]`, `[admin]`, each `[[upstream]]`, each `[[route]]`, `[sim]`,
//! `[access_log]`) is deserialized on its own. When a key fails, the error is recorded at the
//! key's line, the key is dropped and the section retried, so one mistake never hides the
//! next (`section.rs`). Semantic checks then find their lines in the parsed document
//! (`validate.rs`). Only a TOML syntax error stops early.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Value};

use super::listener::{build_listener, check_listener_tables};
use super::section::{Errors, LineIndex, Section};
use super::validate::{
    build_access_log, build_admin, build_route, build_server, build_sim, build_upstream,
    check_listeners, check_unique_matches, check_unique_names,
};
use super::{Config, ConfigError, Readiness, ServerConfig};

const SECTIONS: &str = "server, admin, listener, upstream, route, sim, access_log";

// ---------------------------------------------------------------------------------------------
// Entry point.

pub(super) fn parse(text: &str, base: &std::path::Path) -> Result<Config, Vec<ConfigError>> {
    let lines = LineIndex::new(text);
    let doc = ImDocument::parse(text).map_err(|e| {
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        vec![ConfigError {
            line: lines.line(e.span().map_or(0, |s| s.start)),
            message: format!("TOML syntax error: {message}"),
        }]
    })?;

    let mut errs = Errors::default();
    let mut server = None;
    let mut admin = None;
    let mut sim = None;
    let mut access_log = None;
    let mut upstreams = Vec::new();
    let mut routes = Vec::new();
    let mut listeners = Vec::new();

    let root = doc.as_table();
    for (key, item) in root.iter() {
        let key_line = lines.line_of(root.key(key).and_then(|k| k.span()));
        match key {
            "server" | "admin" | "sim" | "access_log" => {
                if item.is_table_like() {
                    let header = item.span().map_or(key_line, |s| lines.line(s.start));
                    let section = Section::new(&lines, format!("[{key}]"), item.clone(), header);
                    match key {
                        "server" => server = Some(section),
                        "admin" => admin = Some(section),
                        "access_log" => access_log = Some(section),
                        _ => sim = Some(section),
                    }
                } else {
                    errs.push(key_line, format!("`{key}` must be a table: write [{key}]"));
                }
            }
            "upstream" | "route" | "listener" => match table_array(item) {
                Some(tables) => {
                    let list = match key {
                        "upstream" => &mut upstreams,
                        "route" => &mut routes,
                        _ => &mut listeners,
                    };
                    for (i, (table, span)) in tables.into_iter().enumerate() {
                        let header = span.map_or(key_line, |s| lines.line(s.start));
                        let field = if key == "listener" { "address" } else { "name" };
                        let name = table.as_table_like().and_then(|t| t.get(field));
                        let label = match name.and_then(Item::as_str) {
                            Some(name) => format!("{key} {name:?}"),
                            None => format!("[[{key}]] #{}", i + 1),
                        };
                        list.push(Section::new(&lines, label, table, header));
                    }
                }
                None => errs.push(
                    key_line,
                    format!(
                        "`{key}` must be an array of tables: write [[{key}]] (double brackets), \
                         once per {key}"
                    ),
                ),
            },
            other => errs.push(
                key_line,
                format!("unknown section `{other}`; the sections are: {SECTIONS}"),
            ),
        }
    }

    let server_cfg = build_server(server.as_mut(), &mut errs);
    let admin_cfg = build_admin(admin.as_mut(), &mut errs);
    let listener_cfgs: Vec<_> = listeners
        .iter_mut()
        .map(|s| build_listener(s, base, &mut errs))
        .collect();
    check_listeners(
        &server_cfg,
        server.as_ref(),
        &admin_cfg,
        admin.as_ref(),
        !listeners.is_empty(),
        &mut errs,
    );
    check_listener_tables(
        &server_cfg,
        &admin_cfg,
        &listeners,
        &listener_cfgs,
        &mut errs,
    );
    let sim_cfg = sim
        .as_mut()
        .and_then(|s| build_sim(s, &server_cfg, &admin_cfg, &mut errs));
    let access_log_cfg = build_access_log(access_log.as_mut(), &mut errs);

    if upstreams.is_empty() {
        errs.push(
            1,
            "no [[upstream]] is defined; add at least one (with name and backends)",
        );
    }
    if routes.is_empty() {
        errs.push(
            1,
            "no [[route]] is defined; add at least one (with name, path_prefix and upstream)",
        );
    }
    let mut readiness = Readiness::default();
    let upstream_cfgs: Vec<_> = upstreams
        .iter_mut()
        .map(|s| build_upstream(s, &mut readiness, base, &mut errs))
        .collect();
    check_unique_names(&upstreams, "upstream", &mut errs);
    let known: Vec<&str> = upstream_cfgs
        .iter()
        .flatten()
        .map(|u| u.name.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    let route_cfgs: Vec<_> = routes
        .iter_mut()
        .map(|s| build_route(s, &known, &mut errs))
        .collect();
    check_unique_names(&routes, "route", &mut errs);
    check_unique_matches(&routes, &route_cfgs, &mut errs);

    let mut errors = errs.0;
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        errors.dedup();
        return Err(errors);
    }
    Ok(Config {
        server: ServerConfig {
            readiness,
            ..server_cfg
        },
        admin: admin_cfg,
        upstreams: upstream_cfgs.into_iter().flatten().collect(),
        routes: route_cfgs.into_iter().flatten().collect(),
        listeners: listener_cfgs.into_iter().flatten().collect(),
        sim: sim_cfg,
        access_log: access_log_cfg,
    })
}

/// The sections of an `[[upstream]]` / `[[route]]` array, with their header spans. Accepts
/// both `[[route]]` tables and `route = [{ … }, …]`.
fn table_array(item: &Item) -> Option<Vec<(Item, Option<Range<usize>>)>> {
    match item {
        Item::ArrayOfTables(a) => Some(
            a.iter()
                .map(|t| (Item::Table(t.clone()), t.span()))
                .collect(),
        ),
        Item::Value(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::InlineTable(t) => Some((Item::Value(v.clone()), t.span())),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}
