//! Lists as RabbitMQ answers them: a plain array, or, when `page` is given,
//! a page of the filtered and sorted list in RabbitMQ's envelope
//! (`items, page, page_count, page_size, filtered_count, item_count,
//! total_count`).

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Largest page RabbitMQ serves.
const PAGE_SIZE_MAX: usize = 500;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub page: Option<usize>,
    pub page_size: Option<usize>,
    pub name: Option<String>,
    pub use_regex: Option<String>,
    pub sort: Option<String>,
    pub sort_reverse: Option<String>,
    /// Comma-separated fields to keep (`name,messages`).
    pub columns: Option<String>,
}

/// `DELETE` conditions: `if-unused` (queues and exchanges), `if-empty`
/// (queues).
#[derive(Debug, Default, Deserialize)]
pub struct DeleteQuery {
    #[serde(rename = "if-unused")]
    if_unused: Option<String>,
    #[serde(rename = "if-empty")]
    if_empty: Option<String>,
}

impl DeleteQuery {
    pub fn if_unused(&self) -> bool {
        self.if_unused.as_deref() == Some("true")
    }

    pub fn if_empty(&self) -> bool {
        self.if_empty.as_deref() == Some("true")
    }
}

impl ListQuery {
    /// Asks for the whole list as it is: no filter, sort, page or columns.
    pub fn is_plain(&self) -> bool {
        self.page.is_none() && self.name.is_none() && self.sort.is_none() && self.columns.is_none()
    }
}

/// The items as the query asks for them.
pub fn answer(mut items: Vec<Value>, query: &ListQuery) -> Result<Value, ApiError> {
    let total = items.len();
    if let Some(pattern) = query.name.as_deref().filter(|p| !p.is_empty()) {
        let regex = query.use_regex.as_deref() == Some("true");
        let matcher = if regex { Some(regex_lite(pattern)?) } else { None };
        items.retain(|item| {
            let name = item.get("name").and_then(Value::as_str).unwrap_or_default();
            match &matcher {
                Some(m) => m(name),
                None => name.contains(pattern),
            }
        });
    }
    if let Some(field) = query.sort.as_deref().filter(|f| !f.is_empty()) {
        items.sort_by(|a, b| compare(lookup(a, field), lookup(b, field)));
        if query.sort_reverse.as_deref() == Some("true") {
            items.reverse();
        }
    }
    if let Some(columns) = query.columns.as_deref() {
        let keep: Vec<&str> = columns.split(',').map(str::trim).filter(|c| !c.is_empty()).collect();
        for item in &mut items {
            if let Value::Object(map) = item {
                map.retain(|key, _| keep.iter().any(|k| k.split('.').next() == Some(key.as_str())));
            }
        }
    }
    let Some(page) = query.page else {
        return Ok(Value::Array(items));
    };
    let page_size = query.page_size.unwrap_or(100);
    if page == 0 || page_size == 0 || page_size > PAGE_SIZE_MAX {
        return Err(ApiError::BadRequest(format!(
            "page and page_size must be positive, and page_size at most {PAGE_SIZE_MAX}"
        )));
    }
    let filtered = items.len();
    let page_count = filtered.div_ceil(page_size);
    let start = (page - 1).saturating_mul(page_size).min(filtered);
    let end = (start + page_size).min(filtered);
    let page_items: Vec<Value> = items.drain(start..end).collect();
    Ok(serde_json::json!({
        "filtered_count": filtered,
        "item_count": page_items.len(),
        "items": page_items,
        "page": page,
        "page_count": page_count,
        "page_size": page_size,
        "total_count": total,
    }))
}

/// A field by a dotted path (`message_stats.publish`).
fn lookup<'a>(item: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(item, |value, key| value.get(key))
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64().unwrap_or(0.0).total_cmp(&y.as_f64().unwrap_or(0.0))
        }
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        _ => std::cmp::Ordering::Equal,
    }
}

/// A name filter with `use_regex=true`: the server's regex engine.
fn regex_lite(pattern: &str) -> Result<impl Fn(&str) -> bool, ApiError> {
    let regex =
        regex::Regex::new(pattern).map_err(|e| ApiError::BadRequest(format!("invalid regex {pattern}: {e}")))?;
    Ok(move |name: &str| regex.is_match(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<Value> {
        (0..n).map(|i| serde_json::json!({"name": format!("q{i:02}"), "messages": i % 3})).collect()
    }

    #[test]
    fn a_page_comes_in_rabbitmqs_envelope() {
        let query = ListQuery { page: Some(2), page_size: Some(4), ..ListQuery::default() };
        let page = answer(names(10), &query).unwrap();
        assert_eq!(page["items"].as_array().unwrap().len(), 4);
        assert_eq!(page["items"][0]["name"], "q04");
        assert_eq!((page["page_count"].as_u64(), page["total_count"].as_u64()), (Some(3), Some(10)));
        assert_eq!(page["filtered_count"], 10);
    }

    #[test]
    fn names_filter_and_fields_sort() {
        let query = ListQuery {
            name: Some("q0".into()),
            sort: Some("messages".into()),
            sort_reverse: Some("true".into()),
            ..ListQuery::default()
        };
        let list = answer(names(12), &query).unwrap();
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 10);
        assert_eq!(list[0]["messages"], 2);
        let regex = ListQuery { name: Some("^q1[01]$".into()), use_regex: Some("true".into()), ..ListQuery::default() };
        assert_eq!(answer(names(12), &regex).unwrap().as_array().unwrap().len(), 2);
        let bad = ListQuery { page: Some(1), page_size: Some(501), ..ListQuery::default() };
        assert!(answer(names(1), &bad).is_err());
    }
}
