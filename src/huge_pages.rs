//! Asking the kernel for transparent huge pages on large, randomly accessed arrays.

/// Advises the kernel to back `[ptr, ptr + len)` with huge pages (Linux `MADV_HUGEPAGE`,
/// which matters when transparent huge pages are in `madvise` mode, the default of many
/// distributions). Only the whole pages inside the range are advised. Best effort: a
/// kernel without transparent huge pages refuses, and the memory stays on small pages.
pub fn advise(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize).saturating_add(len) / PAGE * PAGE;
        if end > start {
            // SAFETY: madvise with MADV_HUGEPAGE changes how the kernel backs the pages,
            // never their contents or validity; the range lies inside the caller's
            // allocation (rounded inwards to page boundaries).
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping of this process that holds `addr`.
    fn vm_flags_at(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.to_string());
            }
        }
        None
    }

    #[test]
    fn an_advised_array_is_marked_for_huge_pages() {
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        let mut buf: Vec<u64> = Vec::with_capacity(1 << 20);
        let len = buf.capacity() * size_of::<u64>();
        advise(buf.as_mut_ptr().cast(), len);
        let inner = (buf.as_ptr() as usize).next_multiple_of(4096) + 4096;
        let flags = vm_flags_at(inner).expect("the buffer's mapping is in /proc/self/smaps");
        // `hg`: the mapping was madvised MADV_HUGEPAGE. A kernel built without transparent
        // huge pages has no such directory and refuses the advice.
        assert!(
            flags.split_whitespace().any(|f| f == "hg") || !thp.exists(),
            "VmFlags of the advised buffer: {flags}"
        );
        buf.push(1);
        assert_eq!(buf[0], 1);
    }
}
