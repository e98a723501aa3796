//! Parameters by Hugging Face name: reading every parameter of a [`CausalLm`] under the
//! name its checkpoint tensor has (`model.layers.0.self_attn.q_proj.weight`, ...) and
//! replacing parameter values by name. Trainers and checkpoint writers use these; burn's
//! own module paths (`Llama.layers.0...`) never leave this module.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::arch::model::CausalLm;

/// The Hugging Face tensor name of a burn module path (`["Llama", "layers", "0",
/// "self_attn", "q_proj", "weight"]` → `model.layers.0.self_attn.q_proj.weight`).
/// Qwen3.5 read from a VL checkpoint keeps its `model.language_model.` names.
pub fn hf_name(path: &[String]) -> String {
    let prefix = match path.first().map(String::as_str) {
        Some("Qwen35Vl") => crate::arch::qwen35::VL_PREFIX,
        _ => "model",
    };
    let rest: Vec<&str> = path
        .iter()
        .map(String::as_str)
        .skip_while(|p| matches!(*p, "Llama" | "Qwen3" | "Qwen35" | "Qwen35Vl"))
        .collect();
    let joined = rest.join(".");
    if rest.first() == Some(&"lm_head") {
        "lm_head.weight".to_string()
    } else if rest.first() == Some(&"embed_tokens") {
        format!("{prefix}.embed_tokens.weight")
    } else {
        format!("{prefix}.{joined}")
    }
}

/// One parameter, flattened: its Hugging Face name, burn id, shape and values.
#[derive(Debug, Clone)]
pub struct NamedParam<B: Backend> {
    /// Hugging Face tensor name.
    pub name: String,
    /// burn's parameter id (stable for the life of the module).
    pub id: ParamId,
    /// The parameter's shape.
    pub shape: Vec<usize>,
    /// The values, flattened to one dimension.
    pub flat: Tensor<B, 1>,
}

struct Collect<B: Backend> {
    path: Vec<String>,
    out: Vec<NamedParam<B>>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let n: usize = shape.iter().product();
        self.out.push(NamedParam {
            name: hf_name(&self.path),
            id: param.id,
            shape,
            flat: tensor.reshape([n]),
        });
    }
}

/// Every float parameter of `model` in module order (deterministic), by Hugging Face name.
pub fn named_params<B: Backend>(model: &CausalLm<B>) -> Vec<NamedParam<B>> {
    let mut v = Collect {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

struct Replace<'a, B: Backend, F: FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>> {
    path: Vec<String>,
    f: &'a mut F,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend, F: FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>> ModuleMapper<B>
    for Replace<'_, B, F>
{
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        // The mapper is entered for the parameter's own field name too (e.g. `weight`).
        let name = hf_name(&self.path);
        let f = &mut self.f;
        with_flat_values(param, &name, |flat| f(&name, flat))
    }
}

/// `param` with its values replaced by `f(flat values)` (same element count), a leaf that
/// requires gradients exactly when the old value did.
fn with_flat_values<B: Backend, const D: usize>(
    param: Param<Tensor<B, D>>,
    name: &str,
    f: impl FnOnce(Tensor<B, 1>) -> Tensor<B, 1>,
) -> Param<Tensor<B, D>> {
    let (id, tensor, mapper) = param.consume();
    let tracked = tensor.is_require_grad();
    let dims = tensor.dims();
    let n: usize = dims.iter().product();
    let mapped = f(tensor.reshape([n]));
    assert_eq!(
        mapped.dims()[0],
        n,
        "replacement for `{name}` has the wrong number of elements"
    );
    // A reshape of a tracked tensor is an interior node of the autodiff graph; the
    // parameter must be a leaf again to receive gradients.
    let value = mapped.reshape(dims).detach().set_require_grad(tracked);
    Param::from_mapped_value(id, value, mapper)
}

/// Replaces every float parameter by `f(hf_name, flat_values)` (same element count; the
/// result is reshaped back). Parameter ids are kept, and a parameter that required
/// gradients is a fresh autodiff leaf that still requires them.
pub fn map_params<B: Backend, F>(model: CausalLm<B>, mut f: F) -> CausalLm<B>
where
    F: FnMut(&str, Tensor<B, 1>) -> Tensor<B, 1>,
{
    let mut mapper = Replace {
        path: Vec::new(),
        f: &mut f,
        _backend: std::marker::PhantomData,
    };
    model.map(&mut mapper)
}

struct ReplaceSome<'a, B: Backend> {
    path: Vec<String>,
    values: &'a mut BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> ModuleMapper<B> for ReplaceSome<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = hf_name(&self.path);
        match self.values.remove(&name) {
            Some(flat) => with_flat_values(param, &name, |_| flat),
            None => param,
        }
    }
}

/// Replaces the parameters named in `values` (flat, same element count) and takes them out
/// of the map; every other parameter stays the very tensor it was (an autodiff leaf keeps
/// its node, so gradients of graphs built before still find it).
pub fn replace_params<B: Backend>(
    model: CausalLm<B>,
    values: &mut BTreeMap<String, Tensor<B, 1>>,
) -> CausalLm<B> {
    if values.is_empty() {
        return model;
    }
    let mut mapper = ReplaceSome {
        path: Vec::new(),
        values,
    };
    model.map(&mut mapper)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::init::{random_init, tiny_config};
    use crate::arch::model::expected_tensors;
    use crate::config::Architecture;
    use burn::backend::Flex;

    #[test]
    fn names_are_the_checkpoint_names_for_both_architectures() {
        for arch in [Architecture::Llama, Architecture::Qwen3] {
            for tied in [true, false] {
                let mut config = tiny_config(arch, 64);
                config.tie_word_embeddings = tied;
                let model = random_init::<Flex>(&config, 7, &Default::default());
                let mut got: Vec<(String, Vec<usize>)> = named_params(&model)
                    .into_iter()
                    .map(|p| (p.name, p.shape))
                    .collect();
                let mut want: Vec<(String, Vec<usize>)> = expected_tensors(&config)
                    .into_iter()
                    .map(|(n, s, linear)| {
                        if linear {
                            (format!("{n}.weight"), s)
                        } else {
                            (n, s)
                        }
                    })
                    .collect();
                got.sort();
                want.sort();
                assert_eq!(got, want, "{arch:?} tied={tied}");
            }
        }
    }

    #[test]
    fn shared_params_name_the_tied_embedding_only() {
        for arch in [
            Architecture::Llama,
            Architecture::Qwen3,
            Architecture::Qwen35,
        ] {
            for tied in [true, false] {
                let mut config = tiny_config(arch, 64);
                config.tie_word_embeddings = tied;
                let model = random_init::<Flex>(&config, 7, &Default::default());
                let shared = model.shared_params();
                let names: Vec<String> = named_params(&model).into_iter().map(|p| p.name).collect();
                assert_eq!(shared.len(), usize::from(tied), "{arch:?} tied={tied}");
                for n in &shared {
                    assert!(
                        names.contains(n) && n.ends_with("embed_tokens.weight"),
                        "{n}"
                    );
                }
            }
        }
    }

    #[test]
    fn map_params_replaces_by_name() {
        let config = tiny_config(Architecture::Qwen3, 64);
        let model = random_init::<Flex>(&config, 1, &Default::default());
        let mut seen = Vec::new();
        let model = map_params(model, |name, t| {
            seen.push(name.to_string());
            t.zeros_like()
        });
        let after = named_params(&model);
        assert_eq!(
            seen,
            after.iter().map(|p| p.name.clone()).collect::<Vec<_>>()
        );
        for p in after {
            let sum: f32 = p.flat.abs().sum().into_scalar();
            assert_eq!(sum, 0.0, "{}", p.name);
        }
    }

    #[test]
    fn replace_params_touches_only_the_named_and_keeps_the_other_leaves() {
        type A = burn::backend::Autodiff<Flex>;
        let config = tiny_config(Architecture::Qwen3, 64);
        let model = random_init::<A>(&config, 3, &Default::default());
        let before = named_params(&model);
        // A graph built before the replacement: the loss reads every parameter.
        let loss = before
            .iter()
            .map(|p| p.flat.clone().sum())
            .reduce(|a, b| a + b)
            .expect("parameters");
        let target = "model.layers.1.mlp.up_proj.weight";
        let n = before
            .iter()
            .find(|p| p.name == target)
            .unwrap()
            .flat
            .dims()[0];
        let mut values =
            BTreeMap::from([(target.to_string(), Tensor::zeros([n], &Default::default()))]);
        let model = replace_params(model, &mut values);
        assert!(values.is_empty(), "the replacement is taken out of the map");
        let grads = loss.backward();
        let mut found = 0;
        for (old, new) in before.iter().zip(named_params(&model)) {
            assert_eq!(old.name, new.name);
            let changed: f32 = (old.flat.clone().inner() - new.flat.clone().inner())
                .abs()
                .sum()
                .into_scalar();
            if new.name == target {
                assert!(changed > 0.0, "{target} was replaced");
            } else {
                assert_eq!(changed, 0.0, "{}", new.name);
                found += 1;
            }
        }
        assert_eq!(found, before.len() - 1);
        // Untouched parameters are the same leaves: the old graph's gradients reach them
        // through the model's current parameters.
        let mut reached = 0;
        struct Reach<'a> {
            grads: &'a <A as burn::tensor::backend::AutodiffBackend>::Gradients,
            reached: &'a mut usize,
        }
        impl ModuleVisitor<A> for Reach<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
                if param.val().grad(self.grads).is_some() {
                    *self.reached += 1;
                }
            }
        }
        model.visit(&mut Reach {
            grads: &grads,
            reached: &mut reached,
        });
        assert_eq!(reached, before.len() - 1);
    }
}
