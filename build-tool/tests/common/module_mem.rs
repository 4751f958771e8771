//! [`HostMemory`]: module memory in host buffers posing as kernel memory at one address
//! (for `module::check`, which executes nothing), counting what is live and keeping the
//! last freed region's bytes.

/// Host buffers at kernel address `addr`.
#[derive(Default)]
pub struct HostMemory {
    /// The address every region gets.
    pub addr: u64,
    /// Regions not freed yet.
    pub live: Vec<Vec<u8>>,
    /// Regions handed out.
    pub allocs: usize,
    /// The bytes of the last region freed.
    pub last: Vec<u8>,
}

impl HostMemory {
    /// Memory whose regions all start at `addr`.
    pub fn at(addr: u64) -> HostMemory {
        HostMemory {
            addr,
            ..HostMemory::default()
        }
    }
}

impl kernel_loader::module::ModuleMemory for HostMemory {
    fn alloc(&mut self, size: usize) -> Option<kernel_loader::module::Region> {
        let mut v = vec![0u8; size];
        self.allocs += 1;
        let r = kernel_loader::module::Region {
            ptr: v.as_mut_ptr(),
            addr: self.addr,
            size,
        };
        self.live.push(v);
        Some(r)
    }

    unsafe fn protect(
        &mut self,
        _: &kernel_loader::module::Region,
        _: usize,
        _: usize,
        _: kernel_loader::module::Prot,
    ) -> Result<(), kernel_loader::module::ProtectError> {
        Ok(())
    }

    unsafe fn free(&mut self, r: kernel_loader::module::Region) {
        if let Some(i) = self
            .live
            .iter()
            .position(|b| b.as_ptr() == r.ptr.cast_const())
        {
            self.last = self.live.remove(i);
        }
    }
}
