//! The read-only SQL access shared by the foreign stores: rows as JSON objects, on PostgreSQL
//! (`to_jsonb`) or SQLite (each value by its storage class).

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("the `interop` feature needs the `sqlite` or `postgres` feature");

use std::fmt;

use super::Row;
use crate::store::{StoreError, StoreErrorKind};

/// The longest identifier PostgreSQL keeps without truncating.
const MAX_IDENT: usize = 63;

/// A validated, double-quoted SQL identifier (`"name"` or `"schema"."name"`). Table and column
/// names come from configuration and are spliced into SQL, so only plain identifiers pass.
#[derive(Clone, Debug)]
pub(crate) struct Ident(String);

impl Ident {
    /// A table name, optionally schema-qualified.
    pub(crate) fn table(name: &str) -> Result<Self, StoreError> {
        Self::parse(name, 2)
    }

    /// A column name.
    pub(crate) fn column(name: &str) -> Result<Self, StoreError> {
        Self::parse(name, 1)
    }

    fn parse(name: &str, max_parts: usize) -> Result<Self, StoreError> {
        let parts: Vec<&str> = name.split('.').collect();
        let valid = parts.len() <= max_parts
            && parts.iter().all(|part| {
                let mut bytes = part.bytes();
                part.len() <= MAX_IDENT
                    && bytes
                        .next()
                        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                    && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
        if !valid {
            return Err(StoreError::new(
                StoreErrorKind::Schema,
                format!(
                    "invalid table or column name `{}` (expected [A-Za-z_][A-Za-z0-9_]*{})",
                    name.escape_debug(),
                    if max_parts > 1 {
                        ", optionally schema.table"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(Self(
            parts
                .iter()
                .map(|part| format!("\"{part}\""))
                .collect::<Vec<_>>()
                .join("."),
        ))
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection pool to the issuer's database.
#[derive(Clone)]
pub(crate) enum Pool {
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

fn error(context: &str, e: sqlx::Error) -> StoreError {
    let kind = match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            StoreErrorKind::Unavailable
        }
        sqlx::Error::PoolClosed => StoreErrorKind::Unavailable,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            let message = db.message();
            // PostgreSQL: undefined table / column; SQLite: "no such table" / "no such column".
            if code == "42P01" || code == "42703" || message.starts_with("no such") {
                StoreErrorKind::Schema
            } else {
                StoreErrorKind::Other
            }
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreErrorKind::Corrupt,
        _ => StoreErrorKind::Other,
    };
    StoreError::new(kind, context.to_owned()).with_source(e)
}

impl Pool {
    /// Opens `url` so that nothing can be written: SQLite in read-only mode, PostgreSQL with
    /// `default_transaction_read_only`.
    pub(crate) async fn connect_read_only(url: &str) -> Result<Self, StoreError> {
        let invalid = |e: sqlx::Error| {
            StoreError::new(StoreErrorKind::Other, "invalid database URL").with_source(e)
        };
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            use std::str::FromStr;
            let options = sqlx::postgres::PgConnectOptions::from_str(url)
                .map_err(invalid)?
                .options([("default_transaction_read_only", "on")]);
            let pool = sqlx::postgres::PgPoolOptions::new()
                .connect_with(options)
                .await
                .map_err(|e| error("cannot connect to PostgreSQL", e))?;
            return Ok(Pool::Postgres(pool));
        }
        #[cfg(feature = "sqlite")]
        if url.starts_with("sqlite:") {
            use std::str::FromStr;
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .map_err(invalid)?
                .read_only(true)
                .busy_timeout(std::time::Duration::from_secs(5));
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .map_err(|e| error("cannot open the SQLite database", e))?;
            return Ok(Pool::Sqlite(pool));
        }
        let _ = invalid;
        Err(StoreError::new(
            StoreErrorKind::Other,
            "unsupported database URL (expected postgres:// or sqlite:, with that feature on)",
        ))
    }

    pub(crate) fn backend(&self) -> &'static str {
        match self {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(_) => "sqlite",
            #[cfg(feature = "postgres")]
            Pool::Postgres(_) => "postgres",
        }
    }

    /// The `n`th bind placeholder (1-based).
    pub(crate) fn placeholder(&self, n: usize) -> String {
        match self {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(_) => {
                let _ = n;
                "?".to_owned()
            }
            #[cfg(feature = "postgres")]
            Pool::Postgres(_) => format!("${n}"),
        }
    }

    /// Up to `limit` rows of `table` whose `column` is one of `values`, each as a JSON object
    /// of all its columns (SQLite BLOBs are left out).
    pub(crate) async fn rows_where_in(
        &self,
        table: &Ident,
        column: &Ident,
        values: &[&str],
        limit: u32,
    ) -> Result<Vec<Row>, StoreError> {
        let list = (1..=values.len())
            .map(|n| self.placeholder(n))
            .collect::<Vec<_>>()
            .join(", ");
        match self {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => {
                let sql = format!("SELECT * FROM {table} WHERE {column} IN ({list}) LIMIT {limit}");
                let mut query = sqlx::query(&sql);
                for value in values {
                    query = query.bind(*value);
                }
                let rows = query
                    .fetch_all(pool)
                    .await
                    .map_err(|e| error("reading the issuer's key table failed", e))?;
                rows.iter().map(sqlite_row).collect()
            }
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => {
                let sql = format!(
                    "SELECT to_jsonb(t) FROM {table} AS t WHERE t.{column} IN ({list}) LIMIT {limit}"
                );
                let mut query = sqlx::query_scalar::<_, serde_json::Value>(&sql);
                for value in values {
                    query = query.bind(*value);
                }
                let rows = query
                    .fetch_all(pool)
                    .await
                    .map_err(|e| error("reading the issuer's key table failed", e))?;
                rows.into_iter()
                    .map(|value| match value {
                        serde_json::Value::Object(row) => Ok(row),
                        _ => Err(StoreError::new(
                            StoreErrorKind::Corrupt,
                            "to_jsonb returned a non-object",
                        )),
                    })
                    .collect()
            }
        }
    }

    /// The columns of `table` as the connection sees it: SQLite's `pragma_table_info`,
    /// PostgreSQL's `information_schema.columns` in the schema the name resolves to (the
    /// given one, else the first of the `search_path` that has the table). `None` when there
    /// is no such table.
    pub(crate) async fn columns(&self, table: &str) -> Result<Option<Columns>, StoreError> {
        Ident::table(table)?;
        let context = "reading the issuer's table layout failed";
        let names: Vec<String> = match self {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => {
                // An attached database is addressed as `schema.table`, as in queries.
                let (schema, name) = match table.split_once('.') {
                    Some((schema, name)) => (schema, name),
                    None => ("main", table),
                };
                sqlx::query_scalar::<_, String>(
                    "SELECT name FROM pragma_table_info(?1, ?2) ORDER BY cid",
                )
                .bind(name)
                .bind(schema)
                .fetch_all(pool)
                .await
                .map_err(|e| error(context, e))?
            }
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => {
                // `to_regclass` resolves the name exactly as the key query will (quoted, through
                // the connection's search_path), so the columns read are those of that table.
                let resolved: Option<(String, String)> = sqlx::query_as(
                    "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class AS c \
                     JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace \
                     WHERE c.oid = to_regclass($1)",
                )
                .bind(Ident::table(table)?.to_string())
                .fetch_optional(pool)
                .await
                .map_err(|e| error(context, e))?;
                let Some((schema, name)) = resolved else {
                    return Ok(None);
                };
                sqlx::query_scalar::<_, String>(
                    "SELECT column_name::text FROM information_schema.columns \
                     WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                )
                .bind(schema)
                .bind(name)
                .fetch_all(pool)
                .await
                .map_err(|e| error(context, e))?
            }
        };
        // Every table has a column; none means no table (SQLite's pragma returns no rows).
        Ok((!names.is_empty()).then(|| Columns {
            table: table.to_owned(),
            names,
        }))
    }

    /// [`columns`](Self::columns), with a missing table as a schema error naming it.
    pub(crate) async fn require_table(&self, table: &str) -> Result<Columns, StoreError> {
        self.columns(table).await?.ok_or_else(|| {
            StoreError::new(
                StoreErrorKind::Schema,
                format!(
                    "table `{table}` does not exist (or this connection cannot see it)",
                    table = table.escape_debug()
                ),
            )
        })
    }

    /// The first column of `sql`'s rows as text, with one integer bound.
    pub(crate) async fn strings(&self, sql: &str, bind: i64) -> Result<Vec<String>, StoreError> {
        let context = "reading the issuer's permissions failed";
        match self {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => sqlx::query_scalar::<_, String>(sql)
                .bind(bind)
                .fetch_all(pool)
                .await
                .map_err(|e| error(context, e)),
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => sqlx::query_scalar::<_, String>(sql)
                .bind(bind)
                .fetch_all(pool)
                .await
                .map_err(|e| error(context, e)),
        }
    }
}

/// The column names of a table, read once at connect time.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    table: String,
    names: Vec<String>,
}

impl Columns {
    /// Whether the table has `column`.
    pub(crate) fn has(&self, column: &str) -> bool {
        self.names.iter().any(|name| name == column)
    }

    /// `column` must exist: the configuration named it (or the peer always has it).
    pub(crate) fn require(&self, column: &str) -> Result<(), StoreError> {
        if self.has(column) {
            return Ok(());
        }
        Err(StoreError::new(
            StoreErrorKind::Schema,
            format!(
                "table `{}` has no column `{}` (columns: {})",
                self.table.escape_debug(),
                column.escape_debug(),
                self.names.join(", ")
            ),
        ))
    }
}

#[cfg(feature = "sqlite")]
fn sqlite_row(row: &sqlx::sqlite::SqliteRow) -> Result<Row, StoreError> {
    use sqlx::{Column, Row as _, TypeInfo, ValueRef};
    let decode = |e| error("decoding a row of the issuer's key table failed", e);
    let mut out = Row::new();
    for (i, column) in row.columns().iter().enumerate() {
        let class = {
            let raw = row.try_get_raw(i).map_err(decode)?;
            if raw.is_null() {
                None
            } else {
                Some(raw.type_info().name().to_owned())
            }
        };
        let value = match class.as_deref() {
            None => serde_json::Value::Null,
            Some("INTEGER") => row.try_get_unchecked::<i64, _>(i).map_err(decode)?.into(),
            Some("REAL") => {
                serde_json::Number::from_f64(row.try_get_unchecked::<f64, _>(i).map_err(decode)?)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Some("TEXT") => row
                .try_get_unchecked::<String, _>(i)
                .map_err(decode)?
                .into(),
            Some(_) => continue,
        };
        out.insert(column.name().to_owned(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated_and_quoted() {
        assert_eq!(Ident::table("users").unwrap().to_string(), "\"users\"");
        assert_eq!(
            Ident::table("payload.users").unwrap().to_string(),
            "\"payload\".\"users\""
        );
        assert_eq!(
            Ident::column("_verified").unwrap().to_string(),
            "\"_verified\""
        );
        for bad in [
            "",
            "users;drop table x",
            "a\"b",
            "1users",
            "a.b.c",
            "us ers",
            "é",
            &"a".repeat(64),
        ] {
            assert_eq!(
                Ident::table(bad).unwrap_err().kind(),
                StoreErrorKind::Schema,
                "{bad}"
            );
        }
        assert!(Ident::column("a.b").is_err());
    }
}
