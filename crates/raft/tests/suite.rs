//! openraft's own storage test suite against Warren's log storage (the
//! shared write-ahead log, on real files) and state machine adapter.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use warren_raft::{LogStore, Machine, NodeId, SharedLog, StateMachine, TypeConfig};
use warren_storage::{FsBackend, FsyncPolicy};

/// Remembers every command; replies with its index.
#[derive(Default)]
struct Journal(Vec<(u64, Vec<u8>)>);

impl StateMachine for Journal {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.0.push((index, command.to_vec()));
        index.to_le_bytes().to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (index, command) in &self.0 {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&(command.len() as u64).to_le_bytes());
            out.extend_from_slice(command);
        }
        out
    }

    fn restore(&mut self, mut snapshot: &[u8]) -> Result<(), String> {
        self.0.clear();
        while !snapshot.is_empty() {
            let field = |b: &[u8]| b.try_into().map(u64::from_le_bytes).map_err(|_| "short snapshot".to_string());
            let index = field(snapshot.get(..8).ok_or("short snapshot")?)?;
            let len =
                usize::try_from(field(snapshot.get(8..16).ok_or("short snapshot")?)?).map_err(|e| e.to_string())?;
            let command = snapshot.get(16..16 + len).ok_or("short snapshot")?.to_vec();
            self.0.push((index, command));
            snapshot = &snapshot[16 + len..];
        }
        Ok(())
    }
}

/// Each build gets its own directory, removed when the test is done.
struct Builder;

/// Keeps the directory, and stops the log's commit thread, at the end of a test.
struct Guard(Arc<SharedLog>, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl StoreBuilder<TypeConfig, LogStore, Machine<Journal>, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, LogStore, Machine<Journal>), StorageError<NodeId>> {
        let dir = tempfile::tempdir()
            .map_err(|e| StorageError::from(openraft::StorageIOError::write(openraft::AnyError::new(&e))))?;
        let shared = SharedLog::open(Arc::new(FsBackend), dir.path(), FsyncPolicy::Always)
            .map_err(|e| StorageError::from(openraft::StorageIOError::write(openraft::AnyError::new(&e))))?;
        let store = shared.store(7);
        let machine = Machine::open(Journal::default(), Some(dir.path().join("7.snapshot")))?;
        Ok((Guard(shared, dir), store, machine))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("{e}");
    }
}
