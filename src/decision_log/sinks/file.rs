//! Sink `file`: JSON lines appended to a file, rotated by size: when the
//! file reaches `max_bytes` it becomes `path.1`, `path.1` becomes `path.2`,
//! ..., and `path.<max_files>` is deleted.

use std::path::PathBuf;

use tokio::io::AsyncWriteExt;

use super::SinkError;
use crate::decision_log::spool::Frame;

#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: Option<(tokio::fs::File, u64)>,
    buf: Vec<u8>,
}

impl FileSink {
    pub fn new(path: PathBuf, max_bytes: u64, max_files: u32) -> Self {
        FileSink {
            path,
            max_bytes: max_bytes.max(1),
            max_files,
            file: None,
            buf: Vec::new(),
        }
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    async fn rotate(&mut self) -> Result<(), SinkError> {
        self.file = None;
        if self.max_files == 0 {
            tokio::fs::remove_file(&self.path).await?;
            return Ok(());
        }
        let _ = tokio::fs::remove_file(self.rotated(self.max_files)).await;
        for n in (1..self.max_files).rev() {
            let _ = tokio::fs::rename(self.rotated(n), self.rotated(n + 1)).await;
        }
        tokio::fs::rename(&self.path, self.rotated(1)).await?;
        Ok(())
    }

    pub async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        {
            let chunk = frames;
            if self.file.is_none() {
                if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    tokio::fs::create_dir_all(parent).await?;
                }
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .await?;
                let size = file.metadata().await?.len();
                self.file = Some((file, size));
            }
            self.buf.clear();
            for frame in chunk {
                self.buf.extend_from_slice(&frame.payload);
                self.buf.push(b'\n');
            }
            let Some((file, size)) = self.file.as_mut() else {
                return Ok(());
            };
            let result = async {
                file.write_all(&self.buf).await?;
                file.flush().await
            }
            .await;
            if let Err(error) = result {
                self.file = None;
                return Err(error.into());
            }
            *size += self.buf.len() as u64;
            if *size >= self.max_bytes {
                self.rotate().await?;
            }
        }
        Ok(())
    }
}
